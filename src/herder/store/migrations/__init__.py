"""The store's Alembic migration history, one for SQLite and PostgreSQL alike.

``versions/NNNN_*.py`` moves a store from schema ``NNNN - 1`` to ``NNNN``
(revision ids are the schema numbers, zero-padded, so ``meta.schema`` and
``alembic_version`` tell the same story). The head revision builds exactly
what :data:`herder.store.schema.metadata` describes; a test holds that.
Run them through :mod:`herder.store.migrate` (``herder db upgrade``), never
by hand: it hands ``env.py`` the store's own connection and transaction.
"""
