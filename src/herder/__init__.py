"""herder: raise a herd of worker nodes, keep it healthy, ship code to it and feed it tasks."""

__version__ = "0.1.0"
