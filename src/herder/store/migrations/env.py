"""Alembic's entry point: run the revisions on the connection it is handed.

:mod:`herder.store.migrate` opens the store's own transaction (``BEGIN
IMMEDIATE`` on SQLite, so DDL there is transactional too; the asyncpg engine
through ``run_sync`` on PostgreSQL) and puts its connection in
``config.attributes["connection"]``: the upgrade and the stamp it may need
then commit together or not at all. There is no offline (SQL script) mode.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from herder.store.schema import for_dialect

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError(
        "herder's migrations run on a store connection: use `herder db upgrade`, not alembic"
    )
context.configure(connection=connection, target_metadata=for_dialect(connection.dialect.name))
with context.begin_transaction():
    context.run_migrations()
