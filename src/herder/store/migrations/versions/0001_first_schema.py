"""Schema 1, the first the project shipped (commit 5704870): tasks, deps, jobs,
attempts, nodes, events, meta.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    tasks = op.create_table(
        "tasks",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(256)),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("priority", sa.Integer, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("max_attempts", sa.Integer, nullable=False),
        sa.Column("timeout_s", sa.Float),
        sa.Column("ckey", sa.String(1024), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("command", sa.JSON),
        sa.Column("n_deps", sa.Integer, nullable=False),
        sa.Column("pending_deps", sa.Integer, nullable=False),
        sa.Column("run_on_failure", sa.Boolean, nullable=False),
        sa.Column("has_dependents", sa.Boolean, nullable=False),
        sa.Column("node_id", sa.String(128)),
        sa.Column("lease_id", sa.String(64)),
        sa.Column("leased_at", sa.Float),
        sa.Column("reason", sa.String(256)),
        sa.Column("result", sa.LargeBinary),
        sa.Column("error", sa.JSON),
        sa.Column("error_pickle", sa.LargeBinary),
        sa.Column("output", sa.JSON),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("finished_at", sa.Float),
    )
    ready = tasks.c.state == "ready"
    op.create_index(
        "ix_tasks_ready",
        "tasks",
        [tasks.c.ckey, tasks.c.priority.desc(), tasks.c.seq],
        sqlite_where=ready,
        postgresql_where=ready,
    )
    op.create_index("ix_tasks_job_state", "tasks", ["job_id", "state"])
    op.create_index("ix_tasks_state_seq", "tasks", ["state", "seq"])
    op.create_index("ix_tasks_finished", "tasks", ["finished_at"])
    active = tasks.c.state.in_(["leased", "running"])
    op.create_index(
        "ix_tasks_node_active",
        "tasks",
        ["node_id"],
        sqlite_where=active,
        postgresql_where=active,
    )

    op.create_table(
        "deps",
        sa.Column("task_id", sa.String(128), primary_key=True),
        sa.Column("dep_id", sa.String(128), primary_key=True),
    )
    op.create_index("ix_deps_dep", "deps", ["dep_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(256)),
        sa.Column("created_at", sa.Float, nullable=False),
    )

    op.create_table(
        "attempts",
        sa.Column("lease_id", sa.String(64), primary_key=True),
        sa.Column("task_id", sa.String(128), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("node_id", sa.String(128), nullable=False),
        sa.Column("leased_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float),
        sa.Column("ended_at", sa.Float),
        sa.Column("outcome", sa.String(16)),
        sa.Column("reason", sa.String(256)),
        sa.Column("error", sa.JSON),
    )
    op.create_index("ix_attempts_task", "attempts", ["task_id"])

    op.create_table(
        "nodes",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(32), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("host", sa.String(256)),
        sa.Column("pid", sa.Integer),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float),
        sa.Column("reason", sa.String(256)),
    )

    op.create_table(
        "events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(128)),
        sa.Column("node_id", sa.String(128)),
        sa.Column("lease_id", sa.String(64)),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_events_task", "events", ["task_id"])

    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(256), nullable=False),
    )
    op.bulk_insert(meta, [{"key": "schema", "value": "1"}])
