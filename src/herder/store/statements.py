"""The statements of the store's hot path, built once per store, and how they run.

Building a SQLAlchemy construct and deriving its cache key costs more than
SQLite takes to run the statement (profiled: about two thirds of a small
transaction). A construct built once memoises its cache key, and its
compiled form comes from the engine's cache. On SQLite even that execution
path costs more than the statement, so there the constructs are compiled
once more, for the driver (:mod:`herder.store.prepared`), and ``rows``,
``run`` and ``run_many`` execute them there; PostgreSQL runs them through
SQLAlchemy. Lists go through expanding parameters (``ids``); callers keep
them under the dialect's parameter limit (``_chunks``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.model import TaskState
from herder.store import schema
from herder.store.prepared import Prepared, driver_of, run_sql_many

_t = schema.tasks
_d = schema.deps
_a = schema.attempts

READY = TaskState.READY.value
WAITING = TaskState.WAITING.value
ACTIVE = [TaskState.LEASED.value, TaskState.RUNNING.value]

_LEASE_COLUMNS = (
    _t.c.id,
    _t.c.lease_id,
    _t.c.attempt,
    _t.c.kind,
    _t.c.payload,
    _t.c.command,
    _t.c.timeout_s,
    _t.c.n_deps,
    _t.c.seq,
    _t.c.priority,
    _t.c.job_id,
    _t.c.name,
    _t.c.service,
    _t.c.release,
    _t.c.created_at,
)


def _ids() -> sa.BindParameter[Any]:
    return sa.bindparam("ids", expanding=True)


def indexed_state(is_sqlite: bool, *states: str) -> sa.ColumnElement[bool]:
    """``state = 'ready'`` (or ``IN``) for the queries a partial index serves
    (``ix_tasks_ready``, ``ix_tasks_node_active``): on SQLite with the states
    written into the SQL, on PostgreSQL bound.

    A planner takes a partial index only where the query's WHERE implies the
    index's. With the state a bound parameter SQLite decides that anew at
    each execution: it prepares the statement again every time, and an empty
    claim took 111 us instead of 27 (on the database of 1,500 round trips
    of workload B). PostgreSQL keeps it bound: written in, its plan is the
    partial index's, yet ``bench/claims.py``'s claim at 1,000 ready tasks took
    2.3-3.1 ms instead of 1.9-2.4 (6 alternating runs), and bound it stays
    flat to 1,000,000 ready.
    """
    if not is_sqlite:
        return _t.c.state == states[0] if len(states) == 1 else _t.c.state.in_(states)
    written: list[sa.ColumnElement[str]] = [sa.literal_column(f"'{state}'") for state in states]
    return _t.c.state == written[0] if len(written) == 1 else _t.c.state.in_(written)


def state_is(*states: str) -> sa.ColumnElement[bool]:
    """``state IN (states)`` that no index serves: for rows already picked by id.

    Given ``id IN (...) AND state = 'waiting'``, SQLite's planner (which has
    no statistics) may walk the state index, every waiting task, instead
    of looking up the listed ids: measured 11 ms instead of 0.03 ms with
    50,000 tasks waiting. Wrapping the column leaves the primary key as the
    only usable index, on both dialects.
    """
    return sa.func.coalesce(_t.c.state, "").in_(states)


class HotStatements:
    """One instance per store; ``is_sqlite`` picks the dialect's variants.

    PostgreSQL locks what it reads on the hot path (``FOR UPDATE``, and
    ``SKIP LOCKED`` when claiming) so that several coordinators can share
    a table; SQLite has one writer at a time and needs none of it.
    """

    def __init__(self, *, is_sqlite: bool) -> None:
        self.is_sqlite = is_sqlite
        ids = _ids
        # the other dialect's module is not imported: PostgreSQL's costs a SQLite
        # coordinator 20 ms and 2.7 MB (issue 11's cold start and memory)
        insert: Callable[[sa.Table], Any]
        if is_sqlite:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            insert = sqlite_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as postgresql_insert

            insert = postgresql_insert

        # submission
        self.existing = sa.select(_t.c.id).where(_t.c.id.in_(ids()))
        states = sa.select(
            _t.c.id, _t.c.state, _t.c.service.is_not(None).label("is_service")
        ).where(_t.c.id.in_(ids()))
        self.states_locked = states if is_sqlite else states.with_for_update(read=True)
        self.insert_job = insert(schema.jobs).on_conflict_do_nothing()
        # telemetry: a second's readings flushed in two batches keep the later one
        # several coordinators may write one key at once: one statement, no race
        put_meta = insert(schema.meta)
        self.upsert_meta = put_meta.on_conflict_do_update(
            index_elements=[schema.meta.c.key], set_={"value": put_meta.excluded.value}
        )
        upsert = insert(schema.samples)
        self.upsert_samples = upsert.on_conflict_do_update(
            index_elements=[c.name for c in schema.samples.primary_key.columns],
            set_={"data": upsert.excluded.data},
        )
        self.mark_dependents = _t.update().where(_t.c.id.in_(ids())).values(has_dependents=True)

        # claims
        self.ready_head = (
            sa.select(_t.c.id, _t.c.priority, _t.c.seq, _t.c.ckey)
            .where(indexed_state(is_sqlite, READY), _t.c.ckey == sa.bindparam("key"))
            .order_by(_t.c.priority.desc(), _t.c.seq)
            .limit(sa.bindparam("limit"))
        )
        by_key = (
            sa.select(_t.c.id)
            .where(indexed_state(is_sqlite, READY), _t.c.ckey == sa.bindparam("key"))
            .order_by(_t.c.priority.desc(), _t.c.seq)
            .limit(sa.bindparam("limit"))
        )
        by_ids = sa.select(_t.c.id).where(_t.c.id.in_(ids()), state_is(READY))
        if not is_sqlite:
            by_key = by_key.with_for_update(skip_locked=True)
            by_ids = by_ids.with_for_update(skip_locked=True)
        self.claim_by_key = self._lease(by_key)
        self.claim_by_ids = self._lease(by_ids)
        self.dep_edges = sa.select(_d.c.task_id, _d.c.dep_id).where(_d.c.task_id.in_(ids()))
        self.dep_values = sa.select(_t.c.id, _t.c.result).where(
            _t.c.id.in_(ids()), state_is(TaskState.SUCCEEDED.value)
        )
        self.mark_running = (
            _t.update()
            .where(
                _t.c.id == sa.bindparam("tid"),
                _t.c.lease_id == sa.bindparam("lid"),
                _t.c.state == TaskState.LEASED.value,
            )
            .values(state=TaskState.RUNNING.value, started_at=sa.bindparam("now"))
        )

        # results
        lease_rows = sa.select(
            _t.c.id,
            _t.c.lease_id,
            _t.c.state,
            _t.c.attempt,
            _t.c.max_attempts,
            _t.c.node_id,
            _t.c.leased_at,
            _t.c.started_at,
            _t.c.has_dependents,
            _t.c.service,
            _t.c.restarts,
        ).where(_t.c.id.in_(ids()))
        self.lease_rows = lease_rows if is_sqlite else lease_rows.with_for_update()
        by_lease = (_t.c.id == sa.bindparam("tid"), _t.c.lease_id == sa.bindparam("lid"))
        self.finish = (
            _t.update()
            .where(*by_lease)
            .values(
                state=sa.bindparam("state"),
                reason=sa.bindparam("reason"),
                result=sa.bindparam("result"),
                error=sa.bindparam("error"),
                error_pickle=sa.bindparam("error_pickle"),
                output=sa.bindparam("output"),
                started_at=sa.func.coalesce(_t.c.started_at, sa.bindparam("started_at")),
                finished_at=sa.bindparam("finished_at"),
            )
        )
        self.requeue = (
            _t.update()
            .where(*by_lease)
            .values(state=READY, node_id=None, lease_id=None, started_at=None)
        )
        # a service's run ended: back to ready, not charged, one more restart
        self.restart = (
            _t.update()
            .where(*by_lease)
            .values(
                state=READY,
                node_id=None,
                lease_id=None,
                started_at=None,
                attempt=_t.c.attempt - 1,
                restarts=_t.c.restarts + 1,
                service=sa.bindparam("svc"),
            )
        )
        self.insert_attempts = _a.insert()
        self.insert_events = schema.events.insert()

        # dependency release
        self.dependent_counts = (
            sa.select(_d.c.task_id, sa.func.count())
            .where(_d.c.dep_id.in_(ids()))
            .group_by(_d.c.task_id)
        )
        self.count_down = (
            _t.update()
            .where(_t.c.id == sa.bindparam("tid"), _t.c.state == WAITING)
            .values(pending_deps=_t.c.pending_deps - sa.bindparam("n"))
        )
        self.wake_ready = (
            _t.update()
            .where(_t.c.id.in_(ids()), state_is(WAITING), _t.c.pending_deps <= 0)
            .values(state=READY)
        )
        self.fail_waiting = (
            _t.update()
            .where(_t.c.id.in_(ids()), state_is(WAITING))
            .values(
                state=TaskState.FAILED.value,
                reason=sa.bindparam("reason"),
                error=sa.bindparam("error", type_=_t.c.error.type),
                finished_at=sa.bindparam("now"),
            )
        )
        self.dependents_of = sa.select(_d.c.task_id).where(_d.c.dep_id.in_(ids()))
        self.waiting_rows = sa.select(_t.c.id, _t.c.run_on_failure).where(
            _t.c.id.in_(ids()), state_is(WAITING)
        )

        # jobs, hand-backs, resent results
        self.job_started = (
            schema.jobs.update()
            .where(schema.jobs.c.id.in_(ids()), schema.jobs.c.started_at.is_(None))
            .values(started_at=sa.bindparam("now"))
        )
        self.hand_back = (
            _t.update()
            .where(*by_lease, state_is(*ACTIVE))
            .values(
                state=READY,
                node_id=None,
                lease_id=None,
                started_at=None,
                attempt=_t.c.attempt - 1,  # handed back, not failed: not charged
            )
        )
        self.recorded = sa.select(_a.c.lease_id, _a.c.task_id, _a.c.outcome).where(
            _a.c.lease_id.in_(ids())
        )
        self._hot = {id(v) for v in vars(self).values() if isinstance(v, sa.Executable)}
        self._prepared: dict[tuple[int, tuple[str, ...]], Prepared] = {}

    # --- running them -----------------------------------------------------------------

    def rows(self, conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> list[Any]:
        """Run ``stmt`` once; its rows (SELECT, RETURNING), with attribute access."""
        if not self.is_sqlite:
            return list(conn.execute(stmt, params))
        return self._prepare(conn, stmt).rows(driver_of(conn), params)

    def run(self, conn: Connection, stmt: sa.Executable, params: Mapping[str, Any]) -> int:
        """Run ``stmt`` once; how many rows it changed."""
        if not self.is_sqlite:
            return conn.execute(stmt, params).rowcount
        return self._prepare(conn, stmt).run(driver_of(conn), params)

    def run_many(
        self, conn: Connection, stmt: sa.Executable, params: Sequence[Mapping[str, Any]]
    ) -> None:
        """Run ``stmt`` once per parameter set (the same keys in each), as one executemany."""
        if not params:
            return
        if not self.is_sqlite:
            conn.execute(stmt, list(params))
            return
        self._prepare(conn, stmt, tuple(params[0])).run_many(driver_of(conn), params)

    def _prepare(
        self, conn: Connection, stmt: sa.Executable, keys: tuple[str, ...] = ()
    ) -> Prepared:
        """``stmt`` compiled for the driver, once (an INSERT once per set of keys)."""
        if id(stmt) not in self._hot:
            raise ValueError("only the statements built in HotStatements run prepared")
        if not isinstance(stmt, sa.Insert):
            keys = ()  # an UPDATE's SET is its values(), whatever the parameters' names
        key = (id(stmt), keys)
        prepared = self._prepared.get(key)
        if prepared is None:
            assert isinstance(stmt, sa.ClauseElement)
            prepared = Prepared(stmt, conn.dialect, column_keys=keys or None)
            self._prepared[key] = prepared
        return prepared

    def insert_many(self, conn: Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
        """Insert ``rows`` (dicts with the same keys) in one executemany.

        On SQLite the rows go to the driver as tuples, JSON columns encoded
        here: SQLAlchemy's per-row parameter processing took longer than
        SQLite's insert itself (1.5 s of a 100,000-task push). PostgreSQL
        keeps SQLAlchemy's path, whose JSON codecs its driver relies on.
        """
        if not rows:
            return
        if not self.is_sqlite:
            conn.execute(table.insert(), rows)
            return
        names = list(rows[0])
        encoded = [i for i, n in enumerate(names) if isinstance(table.c[n].type, sa.JSON)]
        sql = (
            f"INSERT INTO {table.name} ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})"
        )
        params = []
        for row in rows:
            values = list(row.values())
            for i in encoded:
                if values[i] is not None:
                    values[i] = json.dumps(values[i])
            params.append(tuple(values))
        run_sql_many(driver_of(conn), sql, params)

    def _lease(self, pick: sa.Select[Any]) -> Any:
        """Lease the tasks ``pick`` selects to ``:node``, each under a fresh random lease id."""
        if self.is_sqlite:
            lease_id: Any = sa.func.lower(sa.func.hex(sa.func.randomblob(8)))
        else:
            lease_id = sa.func.substr(
                sa.func.md5(
                    sa.func.random().cast(sa.Text) + sa.func.clock_timestamp().cast(sa.Text)
                ),
                1,
                16,
            )
        return (
            _t.update()
            .where(_t.c.id.in_(pick.scalar_subquery()))
            .values(
                state=TaskState.LEASED.value,
                node_id=sa.bindparam("node"),
                attempt=_t.c.attempt + 1,
                lease_id=lease_id,
                leased_at=sa.bindparam("now"),
                started_at=None,
            )
            .returning(*_LEASE_COLUMNS)
        )
