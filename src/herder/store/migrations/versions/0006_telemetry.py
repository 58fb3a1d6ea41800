"""Schema 6 (commit 7d510a2): telemetry samples, when a job started, and a
job's tasks of one state in submission order (replacing ``ix_tasks_job_state``).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("started_at", sa.Float))
    op.drop_index("ix_tasks_job_state", table_name="tasks")
    op.create_index("ix_tasks_job_state_seq", "tasks", ["job_id", "state", "seq"])
    op.create_table(
        "samples",
        sa.Column("node_id", sa.String(128), primary_key=True),
        sa.Column("task_id", sa.String(128), primary_key=True),
        sa.Column("resolution", sa.Integer, primary_key=True),
        sa.Column("at", sa.Float, primary_key=True),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_samples_age", "samples", ["resolution", "at"])
    op.execute("UPDATE meta SET value = '6' WHERE key = 'schema'")
