"""Schema 2 (commit b75775e): a command attempt's four phases, each timed.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("attempts", sa.Column("phases", sa.JSON))
    op.execute("UPDATE meta SET value = '2' WHERE key = 'schema'")
