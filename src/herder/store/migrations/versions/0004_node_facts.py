"""Schema 4 (commit c74da89): what an agent announces besides labels (data,
resources) and a durable pause.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("data", sa.JSON))
    op.add_column("nodes", sa.Column("resources", sa.JSON))
    op.add_column(
        "nodes", sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.execute("UPDATE meta SET value = '4' WHERE key = 'schema'")
