"""Schema 3 (commits 0f2d0de, 263a5b4): service tasks and their restarts, a
node's provider address and boot deadline, the partial index of services.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("service", sa.JSON(none_as_null=True)))
    op.add_column("tasks", sa.Column("restarts", sa.Integer, nullable=False, server_default="0"))
    op.add_column("nodes", sa.Column("address", sa.String(256)))
    op.add_column("nodes", sa.Column("deadline", sa.Float))
    is_service = sa.column("service").is_not(None)
    op.create_index(
        "ix_tasks_service",
        "tasks",
        ["state"],
        sqlite_where=is_service,
        postgresql_where=is_service,
    )
    op.execute("UPDATE meta SET value = '3' WHERE key = 'schema'")
