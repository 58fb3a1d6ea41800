"""How nodes are created and destroyed: one class per backend behind ``base.Provider``."""
