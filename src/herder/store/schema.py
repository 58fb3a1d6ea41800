"""The one schema definition, for SQLite and PostgreSQL alike.

Indexes are chosen for the hot paths: ``ix_tasks_ready`` is a partial index
holding only ready tasks, so a claim reads the head of one small index
whatever the size of the table; ``ix_deps_dep`` makes releasing dependents
cost the finished task's own edges.
"""

from __future__ import annotations

import sqlalchemy as sa

# A change below needs a new revision in herder/store/migrations/versions that
# moves a store of the previous version here (``meta.schema`` = SCHEMA_VERSION,
# revision id = the number, zero-padded); test_db_migrations checks both agree.
SCHEMA_VERSION = 8

metadata = sa.MetaData()

tasks = sa.Table(
    "tasks",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("job_id", sa.String(128), nullable=False),
    sa.Column("name", sa.String(256)),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("priority", sa.Integer, nullable=False, default=0),
    sa.Column("attempt", sa.Integer, nullable=False, default=0),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("timeout_s", sa.Float),
    sa.Column("ckey", sa.String(1024), nullable=False, default=""),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("payload", sa.LargeBinary),
    sa.Column("command", sa.JSON),
    sa.Column("n_deps", sa.Integer, nullable=False, default=0),
    sa.Column("pending_deps", sa.Integer, nullable=False, default=0),
    sa.Column("run_on_failure", sa.Boolean, nullable=False, default=False),
    sa.Column("has_dependents", sa.Boolean, nullable=False, default=False),
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
    # A service task: restarted when it exits, health-checked. SQL NULL for
    # other tasks (not JSON null), so that ix_tasks_service holds only services.
    # {"spec": ServiceSpec, "backoff_s": ..., "restart_at": ..., "last_exit": ...}
    sa.Column("service", sa.JSON(none_as_null=True)),
    sa.Column("restarts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("release", sa.String(32)),  # the release it runs in (NULL: none)
)

_ready = tasks.c.state == "ready"
_active = tasks.c.state.in_(["leased", "running"])
# The partial indexes name their predicate for SQLite here and for PostgreSQL in
# ``for_dialect``: ``postgresql_where`` here would import SQLAlchemy's PostgreSQL
# dialect (20 ms, 2.7 MB) into every coordinator, those on SQLite too.
ix_tasks_ready = sa.Index(
    "ix_tasks_ready",
    tasks.c.ckey,
    tasks.c.priority.desc(),
    tasks.c.seq,
    sqlite_where=_ready,
)
# A job's tasks of one state in submission order: counts per job, and a page of
# a job's task table read off the index (keyset paging) at a million tasks.
ix_tasks_job_state_seq = sa.Index(
    "ix_tasks_job_state_seq", tasks.c.job_id, tasks.c.state, tasks.c.seq
)
sa.Index("ix_tasks_state_seq", tasks.c.state, tasks.c.seq)
sa.Index("ix_tasks_finished", tasks.c.finished_at)
_service = tasks.c.service.is_not(None)
# ``herder services`` reads the few services without walking the whole table.
ix_tasks_service = sa.Index(
    "ix_tasks_service",
    tasks.c.state,
    sqlite_where=_service,
)
# ``herder release rm`` asks whether any task not yet finished names a release.
ix_tasks_release = sa.Index("ix_tasks_release", tasks.c.release, tasks.c.state)
ix_tasks_node_active = sa.Index(
    "ix_tasks_node_active",
    tasks.c.node_id,
    sqlite_where=_active,
)
_PARTIAL = ((ix_tasks_ready, _ready), (ix_tasks_service, _service), (ix_tasks_node_active, _active))

deps = sa.Table(
    "deps",
    metadata,
    sa.Column("task_id", sa.String(128), primary_key=True),
    sa.Column("dep_id", sa.String(128), primary_key=True),
)
sa.Index("ix_deps_dep", deps.c.dep_id)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("name", sa.String(256)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),  # when its first task was leased
    sa.Column("owner", sa.String(32)),  # the API token that submitted it (None: an admin)
)

attempts = sa.Table(
    "attempts",
    metadata,
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
    sa.Column("phases", sa.JSON),  # a command's fetch/run/upload/cleanup, each timed
)
sa.Index("ix_attempts_task", attempts.c.task_id)

nodes = sa.Table(
    "nodes",
    metadata,
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
    sa.Column("address", sa.String(256)),
    sa.Column("deadline", sa.Float),
    # what the agent announced besides labels: free-form data and its resources
    sa.Column("data", sa.JSON),
    sa.Column("resources", sa.JSON),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    # Several coordinators on one store: the one holding the node's session now
    # (None: no session). With ``last_seen``, written for all of a coordinator's
    # sessions in one statement a second, it tells every coordinator whether a
    # node it does not serve is alive elsewhere (herder.coordinator.peers).
    sa.Column("coordinator", sa.String(64)),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("task_id", sa.String(128)),
    sa.Column("node_id", sa.String(128)),
    sa.Column("lease_id", sa.String(64)),
    sa.Column("data", sa.JSON, nullable=False),
)
sa.Index("ix_events_task", events.c.task_id)

# Telemetry as time series: a node's readings (``task_id`` "") or a task's own,
# every second (``resolution`` 1) for ten minutes, then as one-minute averages
# (``resolution`` 60) for a day (herder.coordinator.telemetry).
samples = sa.Table(
    "samples",
    metadata,
    sa.Column("node_id", sa.String(128), primary_key=True),
    sa.Column("task_id", sa.String(128), primary_key=True),
    sa.Column("resolution", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, primary_key=True),
    sa.Column("data", sa.JSON, nullable=False),
)
sa.Index("ix_samples_age", samples.c.resolution, samples.c.at)

# API tokens (herder.coordinator.auth): a role each, kept as a digest of the secret.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(256)),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float),
    sa.Column("revoked_at", sa.Float),
)

meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)


def for_dialect(name: str) -> sa.MetaData:
    """The metadata as a database of dialect ``name`` holds it.

    PostgreSQL's partial indexes get their predicate here, the first time a
    PostgreSQL store creates, migrates or compares its schema (setting it again
    is a no-op); a coordinator on SQLite never loads that dialect.
    """
    if name == "postgresql":
        for index, where in _PARTIAL:
            index.dialect_options["postgresql"]["where"] = where
    return metadata
