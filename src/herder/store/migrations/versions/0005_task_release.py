"""Schema 5 (commit c68bfc3): the release a task runs in, and the index that
``herder release rm`` asks.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("release", sa.String(32)))
    op.create_index("ix_tasks_release", "tasks", ["release", "state"])
    op.execute("UPDATE meta SET value = '5' WHERE key = 'schema'")
