"""The agent: pairs with a coordinator and runs tasks in slots (worker subprocesses)."""
