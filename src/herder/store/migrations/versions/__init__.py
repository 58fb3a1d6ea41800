"""One revision per store schema version (see herder.store.migrations)."""
