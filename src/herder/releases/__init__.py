"""Releases on a node: each installed once into its own environment.

``cache`` installs a release (its manifest in :mod:`herder.model`, its bundle
built by :mod:`herder.bundle` on the client) into an environment of its own:
once per cache under a file lock, with a size cap and LRU eviction that
never removes an environment in use.
"""
