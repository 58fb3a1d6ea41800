"""Schema 8 (several coordinators on one store): the coordinator holding a
node's session now.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("nodes", sa.Column("coordinator", sa.String(64)))
    op.execute("UPDATE meta SET value = '8' WHERE key = 'schema'")
