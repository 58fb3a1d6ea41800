"""The Store on SQLite (default) or PostgreSQL, through SQLAlchemy Core.

One code path serves both dialects; the differences are named where they
occur: SQLite takes its write lock at ``BEGIN IMMEDIATE`` (one writer at a
time, serialised here by an asyncio lock too), PostgreSQL claims with
``FOR UPDATE SKIP LOCKED`` so several coordinators can share the table.
Every mutating method is one transaction; a driver error becomes
:class:`~herder.errors.StoreError` and the transaction is rolled back whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

from herder.errors import InvalidTransition, StoreError, SubmissionError
from herder.model import (
    FINAL_TASK_STATES,
    TASK_TRANSITIONS,
    AttemptRecord,
    CommandSpec,
    EventRecord,
    JobSummary,
    NodeRecord,
    NodeState,
    Reason,
    ServiceRecord,
    TaskRecord,
    TaskSpec,
    TaskState,
    TokenRecord,
    check_node_transition,
    find_cycle,
    gc_paused,
    sources,
    valid_id,
)
from herder.selector import parse_key
from herder.store import migrate, schema
from herder.store.base import (
    Changes,
    Claimed,
    ClaimRequest,
    Final,
    Sample,
    Store,
    Submission,
    TaskResult,
)
from herder.store.services import (
    Restart,
    restart,
    result_restart,
    service_column,
    service_record,
    spec_of,
    start_delay,
)
from herder.store.sqlite_writer import SqliteWriter
from herder.store.statements import ACTIVE, HotStatements, indexed_state, state_is

log = logging.getLogger("herder.store")

# A coordinator frozen in the middle of a transaction (SIGSTOP, a paused VM, a
# partition that leaves its TCP connection open) would hold its row locks for as
# long as PostgreSQL keeps the session: every other coordinator of the store then
# waits on those rows (a node's row: pairing with it; the queue's: claims)
# indefinitely. The server aborts a session left idle inside a transaction this
# long, which lets the locks go; herder never pauses mid-transaction for
# anything but the next statement, and an aborted turn is retried.
_PG_SESSION_SETTINGS = {"idle_in_transaction_session_timeout": "3000"}  # ms

T = TypeVar("T")
_CHUNK = 2000  # bound on parameters in one IN (...) list
# PostgreSQL: a prepared statement (asyncpg prepares all of them) runs on a
# generic plan after five runs and keeps it until the table's statistics change.
# A plan chosen while the queue was small (a sequential scan matching a 2,000-id
# IN list row by row) stays in force at a million rows unless something runs
# ANALYZE, and autovacuum may be off or minutes behind: filling 150,000 tasks
# took 249 s, against 9 s with statistics kept fresh. So the store analyzes
# the tables it grows: after 10,000 new rows, then each time they grow by a fifth.
_ANALYZE_MIN_ROWS = 10_000
_ANALYZE_GROWTH = 5  # analyze again once the new rows reach 1/5 of those analyzed
_ROWS_PER_INSERT = 5000
_TEXT = 256  # width of the name and reason columns
_CKEY = 1024  # width of the constraint key column
_UNPAIRED_NODE_STATES = (NodeState.REQUESTED, NodeState.BOOTING)
_t = schema.tasks
_d = schema.deps
_a = schema.attempts
_n = schema.nodes
_e = schema.events


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def async_url(url: str) -> str:
    """Map a user's store URL to the async driver SQLAlchemy should use."""
    if url.startswith("sqlite:///"):
        return "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return url
    raise StoreError(f"store URL {url!r} is neither sqlite:///PATH nor postgresql://...")


class SqlStore(Store):
    """A :class:`Store` on a SQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._async_url = async_url(url)
        self.is_sqlite = self._async_url.startswith("sqlite")
        self._sync_url = self._async_url.replace("sqlite+aiosqlite", "sqlite+pysqlite")
        self._writer: sa.Engine | None = None
        self._write_conn: SqliteWriter | None = None  # on the write thread: SQLite's writes
        self._reader: sa.Engine | None = None
        self._async_engine: AsyncEngine | None = None
        self._schema_ok = False  # open() found (or made) the schema this code knows
        self._write_thread: ThreadPoolExecutor | None = None
        self._read_threads: ThreadPoolExecutor | None = None
        # (monotonic time, message) of SQLite's last failed write; set and read
        # only on the one write thread. The message, not the exception: its
        # traceback would keep the failed transaction's batch alive.
        self._write_failed: tuple[float, str] | None = None
        self._jobs_started: set[str] = set()  # jobs whose started_at is known to be set
        # Task order ("oldest first") follows ``seq``: wall-clock nanoseconds,
        # kept strictly increasing here so that batches committed by this
        # process never interleave, even if the clock steps back.
        self._last_seq = 0
        self._sql = HotStatements(is_sqlite=self.is_sqlite)
        self._rows_analyzed = 0  # tasks this process has seen analyzed (PostgreSQL)
        self._rows_since_analyze = 0

    # --- lifecycle -----------------------------------------------------------

    async def open(self) -> None:
        """Connect; create an empty store at the current schema, or refuse one at
        another (:class:`SchemaMismatch` says what to run: ``herder db upgrade``)."""
        if self._schema_ok:
            return
        self._connect()
        await self._write(lambda conn: migrate.prepare(conn, self.url))
        self._schema_ok = True

    async def schema_state(self) -> migrate.SchemaState:
        """The store's schema next to this code's; works on a store ``open`` refuses."""
        self._connect()
        return await self._read(lambda conn: migrate.read_state(conn, self.url))

    async def upgrade_schema(self) -> migrate.Upgraded:
        """Migrate the store to this code's schema in one transaction (``herder db upgrade``)."""
        self._connect()
        return await self._write(lambda conn: migrate.upgrade(conn, self.url))

    async def write_transaction(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction: for operations on the store that
        are not part of its interface (herder.store.vacuum's batches)."""
        return await self._write(fn)

    def _connect(self) -> None:
        """Make the engines (and SQLite's threads) once; no query is sent yet."""
        if self._writer is not None or self._async_engine is not None:
            return
        if self.is_sqlite:
            path = self._sync_url.removeprefix("sqlite+pysqlite:///")
            if path in ("", ":memory:"):
                self._open_memory()
                return
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._writer = sa.create_engine(
                self._sync_url,
                pool_size=1,
                max_overflow=0,
                connect_args={"check_same_thread": False},
            )
            self._reader = sa.create_engine(
                self._sync_url,
                pool_size=4,
                max_overflow=4,
                connect_args={"check_same_thread": False},
            )
            _sqlite_pragmas(self._writer)
            _sqlite_pragmas(self._reader, begin="BEGIN")
            self._write_conn = SqliteWriter(self._writer)
            self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="herder-store-write")
            self._read_threads = ThreadPoolExecutor(4, thread_name_prefix="herder-store-read")
        else:
            # here: SQLAlchemy's asyncio extension loads its ORM, which SQLite stores never use
            from sqlalchemy.ext.asyncio import create_async_engine

            self._async_engine = create_async_engine(
                self._async_url,
                pool_size=8,
                max_overflow=8,
                connect_args={"server_settings": _PG_SESSION_SETTINGS},
            )

    def _open_memory(self) -> None:
        """An in-memory SQLite database lives in one connection and dies with it.

        Separate reader and writer pools would each open an empty database of
        their own, so reads share the writer's one connection and thread (and
        run as its transactions: see ``_run``).
        """
        self._writer = sa.create_engine(
            self._sync_url,
            poolclass=sa.pool.StaticPool,
            connect_args={"check_same_thread": False},
        )
        _sqlite_pragmas(self._writer)
        self._write_conn = SqliteWriter(self._writer)
        self._reader = None
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="herder-store-write")

    async def set_node_paused(self, node_id: str, paused: bool, now: float) -> bool:
        """Pause or resume a node (event ``node_paused``/``node_resumed``); False if
        there is no such node."""

        def _tx(conn: Connection) -> bool:
            res = conn.execute(_n.update().where(_n.c.id == node_id).values(paused=paused))
            if not res.rowcount:
                return False
            action = "node_paused" if paused else "node_resumed"
            self._events(conn, now, [(action, None, node_id, None, {})])
            return True

        return await self._write(_tx)

    async def get_meta(self, key: str) -> str | None:
        def _tx(conn: Connection) -> str | None:
            q = sa.select(schema.meta.c.value).where(schema.meta.c.key == key)
            value = conn.execute(q).scalar_one_or_none()
            return None if value is None else str(value)

        return await self._read(_tx)

    async def set_meta(self, key: str, value: str) -> None:
        def _tx(conn: Connection) -> None:
            conn.execute(self._sql.upsert_meta, {"key": key, "value": value})

        await self._write(_tx)

    async def latest_event_id(self) -> int:
        def _tx(conn: Connection) -> int:
            return int(conn.execute(sa.select(sa.func.max(_e.c.id))).scalar() or 0)

        return await self._read(_tx)

    async def cluster_id(self) -> str:
        """This herd's id, made with the store: providers tag what they create with it."""

        def _tx(conn: Connection) -> str:
            q = sa.select(schema.meta.c.value).where(schema.meta.c.key == "cluster")
            return str(conn.execute(q).scalar_one())

        return await self._read(_tx)

    async def close(self) -> None:
        if self._async_engine is not None:
            await self._async_engine.dispose()
        for pool in (self._write_thread, self._read_threads):
            if pool is not None:
                pool.shutdown(wait=True)
        if self._write_conn is not None:  # after its thread: nothing runs on it now
            self._write_conn.close()
        for engine in (self._writer, self._reader):
            if engine is not None:
                engine.dispose()
        self._writer = self._reader = self._async_engine = None
        self._write_conn = None
        self._schema_ok = False
        self._write_thread = self._read_threads = None

    async def _write(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one write transaction; the commit is durable when this returns.

        SQLite: the whole transaction runs in one dedicated thread (one thread
        hop per transaction, not per statement; one writer at a time anyway).
        PostgreSQL: asyncpg through SQLAlchemy's async engine.
        """
        return await self._run(fn, write=True)

    async def _read(self, fn: Callable[[Connection], T]) -> T:
        return await self._run(fn, write=False)

    async def _run(self, fn: Callable[[Connection], T], *, write: bool) -> T:
        try:
            if self._async_engine is not None:
                if write:
                    async with self._async_engine.begin() as aconn:
                        return await aconn.run_sync(fn)
                async with self._async_engine.connect() as aconn:
                    return await aconn.run_sync(fn)
            writer, loop = self._write_conn, asyncio.get_running_loop()
            if writer is None or self._write_thread is None:
                raise StoreError("the store is not open")
            if write:
                queued_at = time.monotonic()
                return await loop.run_in_executor(
                    self._write_thread, self._write_queued, writer, fn, queued_at
                )
            if self._reader is None or self._read_threads is None:  # in memory: see _open_memory
                return await loop.run_in_executor(self._write_thread, writer.run, fn)
            return await loop.run_in_executor(self._read_threads, _in_transaction, self._reader, fn)
        except sa.exc.DBAPIError as exc:
            raise StoreError(f"store {'write' if write else 'read'} failed: {exc.orig}") from exc
        except OSError as exc:
            # asyncpg's connect errors (refused, unreachable, timed out) reach us raw:
            # SQLAlchemy wraps only what the driver raises once connected
            raise StoreError(f"store {'write' if write else 'read'} failed: {exc}") from exc

    def _write_queued(
        self, writer: SqliteWriter, fn: Callable[[Connection], T], queued_at: float
    ) -> T:
        """Run a SQLite write on the write thread, unless one failed while it waited.

        Writes queue on the one write thread. With the database locked by
        another process, each would wait out the busy timeout in turn: a
        submission queued behind the presence write waited 10 s for that one to
        fail and then 10 s more for its own. A write that was queued before
        the last failure fails at once instead, with its error, so that none
        waits longer than one busy timeout.
        """
        failed = self._write_failed
        if failed is not None and failed[0] >= queued_at:
            raise StoreError(f"store write failed: {failed[1]} (a write queued before failed)")
        try:
            return writer.run(fn)
        except sa.exc.OperationalError as exc:  # locked, I/O error, disk full: the store's
            self._write_failed = (time.monotonic(), str(exc.orig))
            raise

    # --- submission ------------------------------------------------------------

    async def submit(
        self, job_id: str, job_name: str | None, specs: list[TaskSpec], now: float
    ) -> Changes:
        changes, _, errors = await self.cycle(
            submissions=[Submission(job_id, job_name, specs)], now=now
        )
        if errors[0] is not None:
            raise errors[0]
        return changes

    def _submit(self, conn: Connection, sub: Submission, now: float, changes: Changes) -> None:
        """Store one batch, or raise SubmissionError having written nothing of it."""
        job_id, job_name, specs = sub.job_id, sub.job_name, sub.specs
        if not specs:
            raise SubmissionError("the submission holds no tasks", job_id=job_id)
        try:
            valid_id(job_id, "job_id")
        except ValueError as exc:
            raise SubmissionError(str(exc), job_id=job_id) from exc
        if job_name is not None and len(job_name) > _TEXT:
            raise SubmissionError(f"job_name must be at most {_TEXT} characters", job_id=job_id)
        for s in specs:
            # Checked here, not left to the column: on PostgreSQL an overlong
            # value would fail the whole cycle (other batches, results, claims).
            if len(s.constraint_key()) > _CKEY:
                raise SubmissionError(
                    f"task {s.id}: labels must fit in {_CKEY} characters as key=value pairs",
                    task_id=s.id,
                )
        ids = [s.id for s in specs]
        in_batch = set(ids)
        if len(in_batch) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise SubmissionError(f"task id {dup} appears twice in the batch", task_id=dup)
        cycle = find_cycle({s.id: [d for d in s.depends_on if d in in_batch] for s in specs})
        if cycle:
            raise SubmissionError("dependency cycle: " + " -> ".join(cycle), task_ids=cycle)
        _refuse_waiting_on_services(specs, {s.id for s in specs if s.service is not None})
        external = sorted({d for s in specs for d in s.depends_on if d not in in_batch})
        # known at insert for tasks of this batch; only older tasks need an UPDATE
        depended_on = {d for s in specs for d in s.depends_on if d in in_batch}

        def _tx(conn: Connection) -> Any:
            existing = self._existing(conn, ids)
            if existing:
                if len(existing) == len(ids):
                    return changes  # a retry of a batch that was committed: nothing to do
                some = sorted(existing)[:5]
                raise SubmissionError(f"task ids already stored: {', '.join(some)}", task_ids=some)
            ext_state, ext_services = self._states(conn, external)
            unknown = [d for d in external if d not in ext_state]
            if unknown:
                who = next(s.id for s in specs if unknown[0] in s.depends_on)
                raise SubmissionError(
                    f"task {who}: depends_on names unknown task ids: {', '.join(unknown[:5])}",
                    task_id=who,
                    unknown=unknown,
                )
            _refuse_waiting_on_services(specs, ext_services)
            job = {"id": job_id, "name": job_name, "created_at": now, "owner": sub.owner}
            self._sql.run_many(conn, self._sql.insert_job, [job])
            seq0 = max(time.time_ns(), self._last_seq + 1)
            self._last_seq = seq0 + len(specs)
            rows: list[dict[str, Any]] = []
            dep_rows: list[dict[str, str]] = []
            doomed: list[str] = []

            def flush(final: bool) -> None:
                # rows go in as they are made: a million-task batch never holds
                # a million row dicts at once
                if len(rows) >= _ROWS_PER_INSERT or (final and rows):
                    self._sql.insert_many(conn, _t, rows)
                    rows.clear()
                if len(dep_rows) >= _ROWS_PER_INSERT or (final and dep_rows):
                    self._sql.insert_many(conn, _d, dep_rows)
                    dep_rows.clear()

            for i, s in enumerate(specs):
                pending = 0
                dead_dep = False
                for d in s.depends_on:
                    dep_rows.append({"task_id": s.id, "dep_id": d})
                    st = ext_state.get(d)
                    if st is None or st not in (TaskState.SUCCEEDED,):
                        if st is not None and st.is_final:
                            dead_dep = dead_dep or not s.run_on_failure
                            if s.run_on_failure:
                                continue
                        else:
                            pending += 1
                state = TaskState.WAITING if pending or dead_dep else TaskState.READY
                if dead_dep:
                    doomed.append(s.id)
                rows.append(
                    {
                        "id": s.id,
                        "seq": seq0 + i,
                        "job_id": job_id,
                        "name": s.name,
                        "kind": s.kind,
                        "state": state.value,
                        "priority": s.priority,
                        "attempt": 0,
                        "max_attempts": s.max_attempts,
                        "timeout_s": s.timeout_s,
                        "ckey": s.constraint_key(),
                        "labels": s.labels,
                        "payload": s.payload,
                        "command": _command_json(s.command),
                        "service": service_column(s.service),
                        "release": s.release,
                        "n_deps": len(s.depends_on),
                        "pending_deps": pending,
                        "run_on_failure": s.run_on_failure,
                        "has_dependents": s.id in depended_on,
                        "created_at": now,
                    }
                )
                if state is TaskState.READY:
                    changes.newly_ready += 1
                flush(final=False)
            flush(final=True)
            for tchunk in _chunks(external):
                self._sql.run(conn, self._sql.mark_dependents, {"ids": tchunk})
            if doomed:
                self._fail_waiting(conn, doomed, Reason.DEPENDENCY_FAILED, now, changes)

        # No savepoint: every refusal above is decided before the first write,
        # so a refused batch has written nothing when it raises.
        _tx(conn)

    def _existing(self, conn: Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids):
            found.update(r[0] for r in self._sql.rows(conn, self._sql.existing, {"ids": chunk}))
        return found

    def _states(
        self, conn: Connection, ids: Sequence[str]
    ) -> tuple[dict[str, TaskState], set[str]]:
        """Current states, and which of the tasks are services; the rows
        share-locked on PostgreSQL.

        The share lock orders a submission against a concurrent completion of
        a dependency: whichever commits second sees the other's rows.
        """
        out: dict[str, TaskState] = {}
        services: set[str] = set()
        for chunk in _chunks(ids):
            rows = self._sql.rows(conn, self._sql.states_locked, {"ids": chunk})
            for tid, st, is_service in rows:
                out[tid] = TaskState(st)
                if is_service:
                    services.add(tid)
        return out, services

    # --- claims ----------------------------------------------------------------

    async def ready_constraint_keys(self) -> list[str]:
        def _tx(conn: Connection) -> Any:
            res = conn.execute(
                sa.select(_t.c.ckey)
                .where(indexed_state(self.is_sqlite, TaskState.READY.value))
                .distinct()
            )
            return [r[0] for r in res]

        return await self._read(_tx)

    async def count_ready(self, constraint_keys: list[str], limit: int) -> int:
        if not constraint_keys or limit <= 0:
            return 0
        head = (
            sa.select(_t.c.id)
            .where(
                indexed_state(self.is_sqlite, TaskState.READY.value), _t.c.ckey.in_(constraint_keys)
            )
            .limit(limit)
            .subquery()
        )  # reads at most ``limit`` entries of the ready index

        def _tx(conn: Connection) -> Any:
            return int(conn.execute(sa.select(sa.func.count()).select_from(head)).scalar() or 0)

        return await self._read(_tx)

    async def claim(
        self, node_id: str, constraint_keys: list[str], limit: int, now: float
    ) -> list[Claimed]:
        _, claimed, _ = await self.cycle(
            claims=[ClaimRequest(node_id, constraint_keys, limit)], now=now
        )
        return claimed.get(node_id, [])

    async def cycle(
        self,
        *,
        submissions: Sequence[Submission] = (),
        started: Sequence[tuple[str, str]] = (),
        released: Sequence[tuple[str, str]] = (),
        results: Sequence[TaskResult] = (),
        claims: Sequence[ClaimRequest] = (),
        now: float,
    ) -> tuple[Changes, dict[str, list[Claimed]], list[SubmissionError | None]]:
        """One transaction for a turn of the coordinator: new batches, what agents
        reported, then new leases.

        Doing all of it under one commit (one fsync) is what makes the queue
        durable and fast at once. Each submission is all or nothing on its own:
        a refused batch leaves no trace and does not stop the rest.
        """
        changes = Changes()
        claimed: dict[str, list[Claimed]] = {}
        errors: list[SubmissionError | None] = []
        if not (submissions or started or released or results or claims):
            return changes, claimed, errors

        def _tx(conn: Connection) -> Any:
            for sub in submissions:
                try:
                    with gc_paused():
                        self._submit(conn, sub, now, changes)
                    errors.append(None)
                except SubmissionError as exc:
                    errors.append(exc)
            if started:
                self._mark_running(conn, started, now)
            if released:
                self._release_leases(conn, released, now, changes)
            if results:
                self._complete(conn, results, now, changes)
            for req in claims:
                got = self._claim(conn, req, now)
                if got:
                    # extend, not assign: a second request for the same node in
                    # one cycle must not hide the leases of the first
                    claimed.setdefault(req.node_id, []).extend(got)

        await self._write(_tx)
        if not self.is_sqlite and submissions:
            self._rows_since_analyze += sum(
                len(sub.specs) for sub, error in zip(submissions, errors, strict=True) if not error
            )
            if self._rows_since_analyze >= max(
                _ANALYZE_MIN_ROWS, self._rows_analyzed // _ANALYZE_GROWTH
            ):
                await self._analyze()
        return changes, claimed, errors

    async def _analyze(self) -> None:
        """Refresh PostgreSQL's statistics of the tables submissions grow, which
        also makes every session re-plan its prepared statements (see
        ``_ANALYZE_MIN_ROWS``). The turn that triggers it has committed already,
        so a failure here is reported, not raised: it would make the caller
        retry work that is stored."""
        try:
            await self._write(lambda conn: conn.execute(sa.text("ANALYZE tasks, deps, attempts")))
        except StoreError as exc:
            log.warning("could not refresh the planner's statistics: %s", exc)
            return
        self._rows_analyzed += self._rows_since_analyze
        self._rows_since_analyze = 0

    def _claim(self, conn: Connection, req: ClaimRequest, now: float) -> list[Claimed]:
        if req.limit <= 0 or not req.constraint_keys:
            return []
        keys = sorted(set(req.constraint_keys))
        lease = {"node": req.node_id, "now": now}
        key_of: dict[str, str] = {}
        params: dict[str, Any]
        if req.free is not None and any(parse_key(k).resources for k in keys):
            stmt, params = self._claim_fitting(conn, req, keys, key_of)
            if not params["ids"]:
                return []
            params.update(lease)
        elif len(keys) == 1:
            stmt = self._sql.claim_by_key
            params = {**lease, "key": keys[0], "limit": req.limit}
        else:
            # ``ckey IN (...) ORDER BY priority, seq`` cannot be read off the
            # index in order: the database would sort every ready task of those
            # keys. Reading the head of each key's range and merging here costs
            # ``limit`` rows per key, whatever the length of the queue.
            heads: list[Any] = []
            for key in keys:
                heads.extend(
                    self._sql.rows(conn, self._sql.ready_head, {"key": key, "limit": req.limit})
                )
            if not heads:
                return []
            heads.sort(key=lambda r: (-r.priority, r.seq))
            stmt = self._sql.claim_by_ids
            params = {**lease, "ids": [r.id for r in heads[: req.limit]]}
            key_of = {r.id: r.ckey for r in heads}
        rows = self._sql.rows(conn, stmt, params)
        if not rows:
            return []
        rows.sort(key=lambda r: (-r.priority, r.seq))
        self._note_jobs_started(conn, {r.job_id for r in rows}, now)
        dep_results = self._dep_results(conn, [r.id for r in rows if r.n_deps])
        return [
            Claimed(
                task_id=r.id,
                lease_id=r.lease_id,
                attempt=r.attempt,
                kind=r.kind,
                payload=r.payload,
                command=CommandSpec.model_validate(r.command) if r.command else None,
                timeout_s=r.timeout_s,
                dep_results=dep_results.get(r.id, {}),
                job_id=r.job_id,
                name=r.name,
                service=spec_of(r.service) if r.service else None,
                start_delay_s=start_delay(r.service, now),
                ckey=key_of.get(r.id, keys[0]),
                release=r.release,
                created_at=r.created_at,
            )
            for r in rows
        ]

    def _note_jobs_started(self, conn: Connection, job_ids: set[str], now: float) -> None:
        """Record when each job's first task was leased (once: remembered here after)."""
        new = job_ids - self._jobs_started
        if not new:
            return
        self._sql.run(conn, self._sql.job_started, {"ids": sorted(new), "now": now})
        self._jobs_started |= new

    def _claim_fitting(
        self, conn: Connection, req: ClaimRequest, keys: list[str], key_of: dict[str, str]
    ) -> tuple[Any, dict[str, Any]]:
        """The ids to lease when tasks hold resources: by priority, each that still fits.

        Reads at most ``limit`` (or as many as fit alone) from the head of
        each key's range, then takes them in queue order while the node's
        free resources last; a big task that does not fit lets a smaller,
        later one through rather than leaving the node idle.
        """
        free = dict(req.free or {})
        heads: list[Any] = []
        for key in keys:
            limit = parse_key(key).fits(free, req.limit)
            if limit > 0:
                heads.extend(
                    self._sql.rows(conn, self._sql.ready_head, {"key": key, "limit": limit})
                )
        heads.sort(key=lambda r: (-r.priority, r.seq))
        ids: list[str] = []
        for r in heads:
            need = parse_key(r.ckey).resources
            if len(ids) >= req.limit:
                break
            if all(free.get(name, 0) + 1e-9 >= amount for name, amount in need.items()):
                for name, amount in need.items():
                    free[name] = free.get(name, 0) - amount
                ids.append(r.id)
                key_of[r.id] = r.ckey
        return self._sql.claim_by_ids, {"ids": ids}

    def _dep_results(
        self, conn: Connection, task_ids: Sequence[str]
    ) -> dict[str, dict[str, bytes]]:
        # Two lookups by key rather than one join: given the join, SQLite
        # starts from ``state = 'succeeded'`` (ix_tasks_state_seq) and reads
        # every finished task in the table for each claim.
        edges: list[tuple[str, str]] = []
        for chunk in _chunks(task_ids):
            res = self._sql.rows(conn, self._sql.dep_edges, {"ids": chunk})
            edges.extend((tid, did) for tid, did in res)
        results: dict[str, bytes] = {}
        for dchunk in _chunks(sorted({did for _, did in edges})):
            res = self._sql.rows(conn, self._sql.dep_values, {"ids": dchunk})
            results.update((did, result) for did, result in res if result is not None)
        out: dict[str, dict[str, bytes]] = {}
        for tid, did in edges:
            if did in results:
                out.setdefault(tid, {})[did] = results[did]
        return out

    async def mark_running(self, leases: list[tuple[str, str]], now: float) -> None:
        await self.cycle(started=leases, now=now)

    def _mark_running(
        self, conn: Connection, leases: Sequence[tuple[str, str]], now: float
    ) -> None:
        self._sql.run_many(
            conn, self._sql.mark_running, [{"tid": t, "lid": lid, "now": now} for t, lid in leases]
        )

    # --- results -----------------------------------------------------------------

    async def complete(self, results: list[TaskResult], now: float) -> Changes:
        changes, _, _ = await self.cycle(results=results, now=now)
        return changes

    def _complete(
        self, conn: Connection, results: Sequence[TaskResult], now: float, changes: Changes
    ) -> None:
        current = self._lease_rows(conn, [r.task_id for r in results])
        finished: list[dict[str, Any]] = []
        retried: list[dict[str, Any]] = []
        restarted: list[Restart] = []
        attempt_rows: list[dict[str, Any]] = []
        succeeded: list[str] = []
        failed: list[str] = []
        seen: dict[str, str] = {}  # task id -> lease id recorded in this batch
        resent: list[TaskResult] = []
        final_states = {s.value for s in FINAL_TASK_STATES}
        for r in results:
            row = current.get(r.task_id)
            if row is None or r.state not in FINAL_TASK_STATES:
                changes.refused.append(r.lease_id)
                continue
            if r.task_id in seen:
                # The same result twice in one batch is recorded once, acknowledged twice.
                (changes.accepted if seen[r.task_id] == r.lease_id else changes.refused).append(
                    r.lease_id
                )
                continue
            if row.lease_id != r.lease_id:
                resent.append(r)  # stale, unless recorded already and since retried
                continue
            if row.state not in ACTIVE:
                # Already recorded under this lease (a resent result): acknowledge,
                # record nothing, so the agent stops resending.
                (changes.accepted if row.state in final_states else changes.refused).append(
                    r.lease_id
                )
                continue
            seen[r.task_id] = r.lease_id
            changes.accepted.append(r.lease_id)
            attempt_rows.append(
                {
                    "lease_id": r.lease_id,
                    "task_id": r.task_id,
                    "attempt": row.attempt,
                    "node_id": row.node_id or "",
                    # the coordinator's clock, as the task's own times: the agent's
                    # may be skewed or jump, and an end on its clock could precede a
                    # start on ours
                    "leased_at": row.leased_at or now,
                    "started_at": row.started_at,
                    "ended_at": now,
                    "outcome": r.state.value,
                    "reason": _clip(r.reason),
                    "error": r.error,
                    "phases": (r.output or {}).get("phases"),
                }
            )
            if row.service is not None:  # a service's run ended, however: run it again
                restarted.append(result_restart(row, r, now))
                continue
            if r.state is TaskState.FAILED and row.attempt < row.max_attempts:
                retried.append({"tid": r.task_id, "lid": r.lease_id})
                changes.requeued.append(r.task_id)
                continue
            finished.append(
                {
                    "tid": r.task_id,
                    "lid": r.lease_id,
                    "state": r.state.value,
                    "reason": _clip(r.reason),
                    "result": r.result,
                    "error": r.error,
                    "error_pickle": r.error_pickle,
                    "output": r.output,
                    "started_at": r.started_at,
                    "finished_at": now,
                }
            )
            changes.finals.append(
                Final(
                    task_id=r.task_id,
                    state=r.state,
                    reason=_clip(r.reason),
                    result=r.result,
                    error=r.error,
                    error_pickle=r.error_pickle,
                    output=r.output,
                )
            )
            if row.has_dependents:
                (succeeded if r.state is TaskState.SUCCEEDED else failed).append(r.task_id)
        if finished:
            self._sql.run_many(conn, self._sql.finish, finished)
        if retried:
            self._sql.run_many(conn, self._sql.requeue, retried)
            changes.newly_ready += len(retried)
            self._events(conn, now, [("task_retry", t["tid"], None, t["lid"], {}) for t in retried])
        if restarted:
            self._restart(conn, restarted, now, changes)
        if attempt_rows:
            self._sql.run_many(conn, self._sql.insert_attempts, attempt_rows)
        if resent:
            self._ack_recorded(conn, resent, changes)
        if succeeded:
            self._release(conn, succeeded, changes)
        if failed:
            self._fail_dependents(conn, failed, now, changes)

    def _restart(
        self, conn: Connection, runs: Sequence[Restart], now: float, changes: Changes
    ) -> None:
        """Send services whose run ended back to ``ready`` (guarded by their lease)."""
        self._sql.run_many(conn, self._sql.restart, [r.params() for r in runs])
        changes.requeued.extend(r.task_id for r in runs)
        changes.newly_ready += len(runs)
        self._events(conn, now, [r.event() for r in runs])

    def _ack_recorded(
        self, conn: Connection, results: Sequence[TaskResult], changes: Changes
    ) -> None:
        """Acknowledge results whose lease is no longer current but whose outcome was recorded.

        A failed attempt that was retried has handed its lease back; if the
        agent missed the acknowledgement and resends, refusing would tell it
        the result was lost when it is in fact on record (its attempts row).
        """
        recorded: dict[str, tuple[str, str | None]] = {}
        for chunk in _chunks(sorted({r.lease_id for r in results})):
            res = self._sql.rows(conn, self._sql.recorded, {"ids": chunk})
            recorded.update((lid, (tid, outcome)) for lid, tid, outcome in res)
        for r in results:
            ok = recorded.get(r.lease_id) == (r.task_id, r.state.value)
            (changes.accepted if ok else changes.refused).append(r.lease_id)

    def _lease_rows(self, conn: Connection, task_ids: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for chunk in _chunks(task_ids):
            for row in self._sql.rows(conn, self._sql.lease_rows, {"ids": chunk}):
                out[row.id] = row
        return out

    def _release(self, conn: Connection, done: Sequence[str], changes: Changes) -> None:
        """Count down the dependents of ``done`` tasks; those at zero become ready.

        Costs the finished tasks' own edges (index ``ix_deps_dep``), not the queue.
        """
        counts: Counter[str] = Counter()
        for chunk in _chunks(done):
            for tid, n in self._sql.rows(conn, self._sql.dependent_counts, {"ids": chunk}):
                counts[tid] += n
        self._count_down(conn, counts, changes)

    def _fail_dependents(
        self, conn: Connection, dead: Sequence[str], now: float, changes: Changes
    ) -> None:
        """Fail the waiting dependents of ``dead`` tasks, transitively.

        Dependents marked ``run_on_failure`` count the dead task as done instead.
        """
        frontier = list(dead)
        while frontier:
            doomed: list[str] = []
            tolerant: list[str] = []
            # The dead tasks' own edges (ix_deps_dep), then those dependents by
            # key. Not a join: SQLite would start from ``state = 'waiting'`` and
            # read every waiting task in the table.
            dependents: set[str] = set()
            for chunk in _chunks(frontier):
                res = self._sql.rows(conn, self._sql.dependents_of, {"ids": chunk})
                dependents.update(r[0] for r in res)
            for dchunk in _chunks(sorted(dependents)):
                res = self._sql.rows(conn, self._sql.waiting_rows, {"ids": dchunk})
                for tid, rof in res:
                    (tolerant if rof else doomed).append(tid)
            if tolerant:
                self._release_for(conn, frontier, tolerant, changes)
            frontier = sorted(set(doomed))
            if frontier:
                self._fail_waiting(
                    conn, frontier, Reason.DEPENDENCY_FAILED, now, changes, cascade=False
                )

    def _release_for(
        self,
        conn: Connection,
        dead: Sequence[str],
        dependents: Sequence[str],
        changes: Changes,
    ) -> None:
        """Count dead dependencies as done for ``run_on_failure`` dependents."""
        counts: Counter[str] = Counter()
        dead_set = set(dead)
        for chunk in _chunks(sorted(set(dependents))):
            for tid, did in self._sql.rows(conn, self._sql.dep_edges, {"ids": chunk}):
                if did in dead_set:
                    counts[tid] += 1
        self._count_down(conn, counts, changes)

    def _count_down(self, conn: Connection, counts: Counter[str], changes: Changes) -> None:
        """Take ``counts`` off the waiting tasks' pending dependencies; wake those at zero."""
        if not counts:
            return
        self._sql.run_many(
            conn, self._sql.count_down, [{"tid": t, "n": n} for t, n in counts.items()]
        )
        for chunk in _chunks(list(counts)):
            changes.newly_ready += self._sql.run(conn, self._sql.wake_ready, {"ids": chunk})

    def _fail_waiting(
        self,
        conn: Connection,
        ids: Sequence[str],
        reason: str,
        now: float,
        changes: Changes,
        *,
        cascade: bool = True,
    ) -> None:
        error = {"type": "DependencyFailed", "message": "a task this one depends on failed"}
        for chunk in _chunks(ids):
            self._sql.run(
                conn,
                self._sql.fail_waiting,
                {"ids": chunk, "reason": reason, "error": error, "now": now},
            )
        changes.finals.extend(
            Final(task_id=t, state=TaskState.FAILED, reason=reason, error=error) for t in ids
        )
        self._events(conn, now, [("task_failed", t, None, None, {"reason": reason}) for t in ids])
        if cascade:
            self._fail_dependents(conn, ids, now, changes)

    # --- lease loss, hand-back, adoption ------------------------------------------

    async def requeue_node(
        self, node_id: str, reason: str, now: float, keep: Collection[str] = ()
    ) -> Changes:
        changes = Changes()

        def _tx(conn: Connection) -> Any:
            q = sa.select(
                _t.c.id,
                _t.c.lease_id,
                _t.c.attempt,
                _t.c.max_attempts,
                _t.c.leased_at,
                _t.c.started_at,
                _t.c.node_id,
                _t.c.service,
                _t.c.restarts,
            ).where(_t.c.node_id == node_id, indexed_state(self.is_sqlite, *ACTIVE))
            if not self.is_sqlite:
                q = q.with_for_update()
            rows = [r for r in conn.execute(q) if r.lease_id not in keep]
            if not rows:
                return changes
            services = [restart(r, reason=reason, now=now) for r in rows if r.service is not None]
            tasks = [r for r in rows if r.service is None]
            again = [r for r in tasks if r.attempt < r.max_attempts]
            spent = [r for r in tasks if r.attempt >= r.max_attempts]
            if services:
                self._restart(conn, services, now, changes)
            if again:
                conn.execute(
                    _t.update()
                    .where(_t.c.id == sa.bindparam("tid"), _t.c.lease_id == sa.bindparam("lid"))
                    .values(
                        state=TaskState.READY.value, node_id=None, lease_id=None, started_at=None
                    ),
                    [{"tid": r.id, "lid": r.lease_id} for r in again],
                )
                changes.requeued.extend(r.id for r in again)
                changes.newly_ready += len(again)
            error = {"type": "TaskLost", "message": f"node {node_id} was lost ({reason})"}
            if spent:
                conn.execute(
                    _t.update()
                    .where(_t.c.id == sa.bindparam("tid"), _t.c.lease_id == sa.bindparam("lid"))
                    .values(
                        state=TaskState.FAILED.value,
                        reason=Reason.LOST.value,
                        error=error,
                        finished_at=now,
                    ),
                    [{"tid": r.id, "lid": r.lease_id} for r in spent],
                )
                changes.finals.extend(
                    Final(task_id=r.id, state=TaskState.FAILED, reason=Reason.LOST, error=error)
                    for r in spent
                )
            conn.execute(
                _a.insert(),
                [
                    _attempt_row(
                        r.id, r.lease_id, r.attempt, node_id, r, now, "lost", _clip(reason)
                    )
                    for r in rows
                ],
            )
            self._events(
                conn,
                now,
                [("task_requeued", r.id, node_id, r.lease_id, {"reason": reason}) for r in again]
                + [("task_failed", r.id, node_id, r.lease_id, {"reason": "lost"}) for r in spent],
            )
            if spent:
                self._fail_dependents(conn, [r.id for r in spent], now, changes)

        await self._write(_tx)
        return changes

    async def release_leases(self, leases: list[tuple[str, str]], now: float) -> Changes:
        changes, _, _ = await self.cycle(released=leases, now=now)
        return changes

    def _release_leases(
        self, conn: Connection, leases: Sequence[tuple[str, str]], now: float, changes: Changes
    ) -> None:
        current = self._lease_rows(conn, [tid for tid, _ in leases])
        running = [
            current[tid]
            for tid, lid in leases
            if tid in current
            and current[tid].lease_id == lid
            and current[tid].service is not None
            and current[tid].state == TaskState.RUNNING.value
        ]
        if running:
            self._release_services(conn, running, now, changes)
        ran = {r.id for r in running}
        for tid, lid in leases:
            if tid in ran:
                continue
            if self._sql.run(conn, self._sql.hand_back, {"tid": tid, "lid": lid}):
                changes.requeued.append(tid)
                changes.newly_ready += 1

    def _release_services(
        self, conn: Connection, rows: Sequence[Any], now: float, changes: Changes
    ) -> None:
        """Services stopped and handed back by their agent (draining, interrupted):
        a run ended, so a restart, recorded in ``attempts`` as ``released``."""
        runs = [restart(r, reason=Reason.HANDED_BACK, now=now) for r in rows]
        conn.execute(
            _a.insert(),
            [
                _attempt_row(
                    r.id,
                    r.lease_id,
                    r.attempt,
                    r.node_id or "",
                    r,
                    now,
                    "released",
                    Reason.HANDED_BACK.value,
                )
                for r in rows
            ],
        )
        self._restart(conn, runs, now, changes)

    async def adopt(self, node_id: str, leases: list[tuple[str, str]]) -> list[str]:
        if not leases:
            return []
        kept: list[str] = []

        def _tx(conn: Connection) -> Any:
            for tid, lid in leases:
                res = conn.execute(
                    _t.update()
                    .where(_t.c.id == tid, _t.c.lease_id == lid, _t.c.state.in_(ACTIVE))
                    .values(node_id=node_id)
                )
                if res.rowcount:
                    kept.append(lid)

        await self._write(_tx)
        return kept

    async def leases_of(self, node_id: str) -> list[tuple[str, str]]:
        def _tx(conn: Connection) -> Any:
            res = conn.execute(
                sa.select(_t.c.id, _t.c.lease_id).where(
                    _t.c.node_id == node_id, indexed_state(self.is_sqlite, *ACTIVE)
                )
            )
            return [(r[0], r[1]) for r in res]

        return await self._read(_tx)

    async def cancel(self, task_ids: list[str] | None, job_id: str | None, now: float) -> Changes:
        changes = Changes()
        cancellable = sorted(s.value for s in sources(TASK_TRANSITIONS, TaskState.CANCELLED))

        def _tx(conn: Connection) -> Any:
            q = sa.select(
                _t.c.id,
                _t.c.state,
                _t.c.node_id,
                _t.c.lease_id,
                _t.c.attempt,
                _t.c.leased_at,
                _t.c.started_at,
            )
            rows: list[Any] = []
            if task_ids is not None:
                for chunk in _chunks(task_ids):
                    rows.extend(conn.execute(q.where(_t.c.id.in_(chunk), state_is(*cancellable))))
            if job_id is not None:
                by_job = q.where(_t.c.job_id == job_id, _t.c.state.in_(cancellable))
                rows.extend(conn.execute(by_job))
            if not rows:
                return changes
            ids = sorted({r.id for r in rows})
            for chunk in _chunks(ids):
                conn.execute(
                    _t.update()
                    .where(_t.c.id.in_(chunk), state_is(*cancellable))
                    .values(
                        state=TaskState.CANCELLED.value,
                        reason=Reason.CANCELLED.value,
                        finished_at=now,
                    )
                )
            # a task named in task_ids and in job_id's job comes back twice: once here
            active = {r.id: r for r in rows if r.state in ACTIVE and r.lease_id}
            changes.cancel_leases = [(r.node_id, r.lease_id) for r in active.values() if r.node_id]
            if active:
                conn.execute(
                    _a.insert(),
                    [
                        _attempt_row(
                            r.id,
                            r.lease_id,
                            r.attempt,
                            r.node_id or "",
                            r,
                            now,
                            "cancelled",
                            "cancelled",
                        )
                        for r in active.values()
                    ],
                )
            changes.finals.extend(
                Final(task_id=t, state=TaskState.CANCELLED, reason=Reason.CANCELLED) for t in ids
            )
            self._events(conn, now, [("task_cancelled", t, None, None, {}) for t in ids])
            self._fail_dependents(conn, ids, now, changes)

        await self._write(_tx)
        return changes

    # --- queries -------------------------------------------------------------------

    async def task(self, task_id: str) -> TaskRecord | None:
        def _tx(conn: Connection) -> Any:
            row = (conn.execute(sa.select(_t).where(_t.c.id == task_id))).first()
            if row is None:
                return None
            dep_ids = [
                r[0] for r in conn.execute(sa.select(_d.c.dep_id).where(_d.c.task_id == task_id))
            ]
            return _task_record(row, dep_ids)

        return await self._read(_tx)

    async def tasks(
        self,
        *,
        states: Sequence[TaskState] | None = None,
        job_id: str | None = None,
        node_id: str | None = None,
        name: str | None = None,
        limit: int = 100,
        after: str | None = None,
        descending: bool = False,
    ) -> list[TaskRecord]:
        limit = max(1, min(limit, 10_000))
        wanted = list(dict.fromkeys(states)) if states else list(TaskState)
        order = (_t.c.seq.desc(), _t.c.id.desc()) if descending else (_t.c.seq, _t.c.id)
        base = sa.select(_t).order_by(*order).limit(limit)
        if job_id is not None:
            base = base.where(_t.c.job_id == job_id)
        if node_id is not None:
            base = base.where(_t.c.node_id == node_id)
        if name is not None:
            base = base.where(_t.c.name.like(_glob_to_like(name), escape="\\"))

        def _tx(conn: Connection) -> Any:
            page = base
            if after is not None:
                anchor = (conn.execute(sa.select(_t.c.seq).where(_t.c.id == after))).scalar()
                if anchor is not None:
                    if descending:
                        page = page.where(
                            sa.or_(_t.c.seq < anchor, sa.and_(_t.c.seq == anchor, _t.c.id < after))
                        )
                    else:
                        page = page.where(
                            sa.or_(_t.c.seq > anchor, sa.and_(_t.c.seq == anchor, _t.c.id > after))
                        )
            # One range per state, each read off (state, seq) or (job, state, seq)
            # in order, then merged: ``state IN (...) ORDER BY seq`` would sort
            # every matching row first (a million of them in a big queue).
            rows: list[Any] = []
            for state in wanted:
                rows.extend(conn.execute(page.where(_t.c.state == state.value)))
            rows.sort(key=lambda r: (r.seq, r.id), reverse=descending)
            rows = rows[:limit]
            deps_of: dict[str, list[str]] = {r.id: [] for r in rows}
            for chunk in _chunks(list(deps_of)):
                res = conn.execute(
                    sa.select(_d.c.task_id, _d.c.dep_id).where(_d.c.task_id.in_(chunk))
                )
                for tid, did in res:
                    deps_of[tid].append(did)
            return [_task_record(r, sorted(deps_of[r.id])) for r in rows]

        return await self._read(_tx)

    async def timeline(
        self, *, job_id: str | None = None, since: float | None = None, limit: int = 5000
    ) -> list[dict[str, Any]]:
        """Ended attempts (the attempts table) and the leases held now (the tasks table)."""
        a = schema.attempts
        limit = max(1, min(limit, 100_000))
        ended = (
            sa.select(
                a.c.task_id, a.c.attempt, a.c.node_id, a.c.leased_at, a.c.started_at,
                a.c.ended_at, a.c.outcome, _t.c.name, _t.c.job_id,
            )
            .join(_t, _t.c.id == a.c.task_id)
            .order_by(a.c.leased_at)
            .limit(limit)
        )  # fmt: skip
        held = sa.select(
            _t.c.id.label("task_id"), _t.c.attempt, _t.c.node_id, _t.c.leased_at,
            _t.c.started_at, _t.c.name, _t.c.job_id,
        ).where(_t.c.state.in_(ACTIVE))  # fmt: skip
        if job_id is not None:
            ended = ended.where(_t.c.job_id == job_id)
            held = held.where(_t.c.job_id == job_id)
        if since is not None:
            ended = ended.where(a.c.leased_at >= since)
            held = held.where(_t.c.leased_at >= since)

        def row(r: Any, end: float | None, state: str) -> dict[str, Any]:
            return {
                "task_id": r.task_id,
                "name": r.name,
                "job_id": r.job_id,
                "node_id": r.node_id,
                "attempt": r.attempt,
                "start": r.started_at or r.leased_at,
                "end": end,
                "state": state,
            }

        def _tx(conn: Connection) -> Any:
            rows = [row(r, r.ended_at, r.outcome or "ended") for r in conn.execute(ended)]
            rows += [row(r, None, "running") for r in conn.execute(held.limit(limit))]
            rows.sort(key=lambda r: r["start"])
            return rows[:limit]

        return await self._read(_tx)

    async def job_owners(self, task_ids: list[str] | None, job_id: str | None) -> set[str | None]:
        j = schema.jobs

        def _tx(conn: Connection) -> set[str | None]:
            owners: set[str | None] = set()
            if job_id is not None:
                owners.update(conn.execute(sa.select(j.c.owner).where(j.c.id == job_id)).scalars())
            for chunk in _chunks(task_ids or []):
                q = (
                    sa.select(j.c.owner)
                    .join(_t, _t.c.job_id == j.c.id)
                    .where(_t.c.id.in_(chunk))
                    .distinct()
                )
                owners.update(conn.execute(q).scalars())
            return owners

        return await self._read(_tx)

    # --- API tokens ----------------------------------------------------------------

    async def add_token(self, token: TokenRecord) -> None:
        def _tx(conn: Connection) -> None:
            conn.execute(schema.tokens.insert().values(**token.model_dump()))

        await self._write(_tx)

    async def tokens(self) -> list[TokenRecord]:
        q = sa.select(schema.tokens).order_by(schema.tokens.c.created_at, schema.tokens.c.id)

        def _tx(conn: Connection) -> list[TokenRecord]:
            return [TokenRecord.model_validate(dict(r._mapping)) for r in conn.execute(q)]

        return await self._read(_tx)

    async def revoke_token(self, token_id: str, now: float) -> TokenRecord | None:
        t = schema.tokens

        def _tx(conn: Connection) -> TokenRecord | None:
            conn.execute(
                t.update()
                .where(t.c.id == token_id, t.c.revoked_at.is_(None))
                .values(revoked_at=now)
            )
            row = conn.execute(sa.select(t).where(t.c.id == token_id)).first()
            return None if row is None else TokenRecord.model_validate(dict(row._mapping))

        return await self._write(_tx)

    # --- telemetry ---------------------------------------------------------------

    async def add_samples(self, samples: list[Sample]) -> None:
        rows = [
            {
                "node_id": x.node_id,
                "task_id": x.task_id,
                "resolution": x.resolution,
                "at": x.at,
                "data": x.data,
            }
            for x in samples
        ]

        def _tx(conn: Connection) -> None:
            if rows:
                conn.execute(self._sql.upsert_samples, rows)

        await self._write(_tx)

    async def roll_up_samples(
        self, *, fine_before: float, coarse_before: float, resolution: int
    ) -> int:
        s = schema.samples

        # Whole buckets only: a bucket rolled up now has no fine samples left
        # to come, so every coarse point is written once, never merged.
        cutoff = fine_before - fine_before % resolution
        fine = (s.c.resolution < resolution, s.c.at < cutoff)

        def _tx(conn: Connection) -> int:
            groups: dict[tuple[str, str, float], list[dict[str, float]]] = {}
            for r in conn.execute(sa.select(s).where(*fine)):
                bucket = r.at - r.at % resolution
                groups.setdefault((r.node_id, r.task_id, bucket), []).append(r.data)
            if groups:
                conn.execute(
                    s.insert(),
                    [
                        {"node_id": n, "task_id": t, "resolution": resolution, "at": at,
                         "data": _averaged(points)}
                        for (n, t, at), points in groups.items()
                    ],
                )  # fmt: skip
                conn.execute(s.delete().where(*fine))
            conn.execute(s.delete().where(s.c.at < coarse_before))
            return sum(len(points) for points in groups.values())

        return await self._write(_tx)

    async def samples(
        self, node_id: str | None, since: float, resolution: int, *, task_id: str = ""
    ) -> list[Sample]:
        s = schema.samples
        q = (
            sa.select(s)
            .where(s.c.resolution == resolution, s.c.at >= since, s.c.task_id == task_id)
            .order_by(s.c.at)
        )
        if node_id is not None:
            q = q.where(s.c.node_id == node_id)

        def _tx(conn: Connection) -> Any:
            return [
                Sample(r.node_id, r.task_id, r.resolution, r.at, dict(r.data))
                for r in conn.execute(q)
            ]

        return await self._read(_tx)

    async def attempts(self, task_id: str) -> list[AttemptRecord]:
        """Ended attempts, then the current lease if the task holds one."""

        def _tx(conn: Connection) -> Any:
            res = list(
                conn.execute(
                    sa.select(_a)
                    .where(_a.c.task_id == task_id)
                    .order_by(_a.c.attempt, _a.c.leased_at)
                )
            )
            cur = (
                conn.execute(
                    sa.select(
                        _t.c.lease_id, _t.c.attempt, _t.c.node_id, _t.c.leased_at, _t.c.started_at
                    ).where(_t.c.id == task_id, _t.c.state.in_(ACTIVE))
                )
            ).first()
            current = (
                [
                    AttemptRecord(
                        task_id=task_id,
                        attempt=cur.attempt,
                        lease_id=cur.lease_id,
                        node_id=cur.node_id or "",
                        leased_at=cur.leased_at or 0.0,
                        started_at=cur.started_at,
                        ended_at=None,
                        outcome=None,
                        reason=None,
                    )
                ]
                if cur is not None
                else []
            )
            return [
                AttemptRecord(
                    task_id=r.task_id,
                    attempt=r.attempt,
                    lease_id=r.lease_id,
                    node_id=r.node_id,
                    leased_at=r.leased_at,
                    started_at=r.started_at,
                    ended_at=r.ended_at,
                    outcome=r.outcome,
                    reason=r.reason,
                    error=r.error,
                    phases=r.phases,
                )
                for r in res
            ] + current

        return await self._read(_tx)

    async def services(self, *, ended: bool = False) -> list[ServiceRecord]:
        live = [s.value for s in TaskState if not s.is_final]
        q = (
            sa.select(
                _t.c.id,
                _t.c.name,
                _t.c.job_id,
                _t.c.state,
                _t.c.node_id,
                _t.c.lease_id,
                _t.c.restarts,
                _t.c.started_at,
                _t.c.service,
            )
            .where(_t.c.service.is_not(None))  # the partial index ix_tasks_service
            .order_by(_t.c.seq, _t.c.id)
        )
        if not ended:
            q = q.where(_t.c.state.in_(live))

        def _tx(conn: Connection) -> Any:
            return [service_record(r) for r in conn.execute(q)]

        return await self._read(_tx)

    async def finals(self, task_ids: list[str]) -> list[Final]:
        out: list[Final] = []
        finals = [s.value for s in FINAL_TASK_STATES]

        def _tx(conn: Connection) -> Any:
            for chunk in _chunks(task_ids):
                res = conn.execute(
                    sa.select(
                        _t.c.id,
                        _t.c.state,
                        _t.c.reason,
                        _t.c.result,
                        _t.c.error,
                        _t.c.error_pickle,
                        _t.c.output,
                    ).where(_t.c.id.in_(chunk), state_is(*finals))
                )
                out.extend(
                    Final(
                        task_id=r.id,
                        state=TaskState(r.state),
                        reason=r.reason,
                        result=r.result,
                        error=r.error,
                        error_pickle=r.error_pickle,
                        output=r.output,
                    )
                    for r in res
                )

        await self._read(_tx)
        return out

    async def job(self, job_id: str) -> JobSummary | None:
        def _tx(conn: Connection) -> Any:
            row = (conn.execute(sa.select(schema.jobs).where(schema.jobs.c.id == job_id))).first()
            if row is None:
                return None
            res = conn.execute(
                sa.select(_t.c.state, sa.func.count())
                .where(_t.c.job_id == job_id)
                .group_by(_t.c.state)
            )
            return JobSummary(
                id=row.id,
                name=row.name,
                created_at=row.created_at,
                started_at=row.started_at,
                counts={s: n for s, n in res},
            )

        return await self._read(_tx)

    async def jobs(self, limit: int = 100) -> list[JobSummary]:
        def _tx(conn: Connection) -> Any:
            rows = list(
                conn.execute(
                    sa.select(schema.jobs)
                    .order_by(schema.jobs.c.created_at.desc(), schema.jobs.c.id)
                    .limit(limit)
                )
            )
            counts: dict[str, dict[str, int]] = {r.id: {} for r in rows}
            if rows:
                res = conn.execute(
                    sa.select(_t.c.job_id, _t.c.state, sa.func.count())
                    .where(_t.c.job_id.in_(list(counts)))
                    .group_by(_t.c.job_id, _t.c.state)
                )
                for jid, st, n in res:
                    counts[jid][st] = n
            return [
                JobSummary(
                    id=r.id,
                    name=r.name,
                    created_at=r.created_at,
                    started_at=r.started_at,
                    counts=counts[r.id],
                )
                for r in rows
            ]

        return await self._read(_tx)

    async def counts(self) -> dict[str, int]:
        def _tx(conn: Connection) -> Any:
            res = conn.execute(sa.select(_t.c.state, sa.func.count()).group_by(_t.c.state))
            return {s: n for s, n in res}

        return await self._read(_tx)

    async def release_users(self, release_id: str) -> dict[str, int]:
        def _tx(conn: Connection) -> Any:
            unfinished = [s.value for s in TaskState if not s.is_final]
            res = conn.execute(
                sa.select(_t.c.state, sa.func.count())
                .where(_t.c.release == release_id, _t.c.state.in_(unfinished))
                .group_by(_t.c.state)
            )
            return {s: n for s, n in res}

        return await self._read(_tx)

    async def finished_since(self, since: float) -> int:
        def _tx(conn: Connection) -> Any:
            res = conn.execute(
                sa.select(sa.func.count()).select_from(_t).where(_t.c.finished_at >= since)
            )
            return int(res.scalar() or 0)

        return await self._read(_tx)

    # --- nodes and events ------------------------------------------------------------

    async def upsert_node(self, node: NodeRecord, *, coordinator: str | None = None) -> None:
        """Record a node as it pairs; ``coordinator``: the one that holds its session now."""
        values = node.model_dump(mode="json")
        if coordinator is not None:
            values["coordinator"] = coordinator

        def _tx(conn: Connection) -> Any:
            res = conn.execute(
                _n.update()
                .where(_n.c.id == node.id)
                .values(**{k: v for k, v in values.items() if k != "id"})
            )
            if not res.rowcount:
                conn.execute(_n.insert().values(**values))
            self._events(
                conn,
                time.time(),
                [("node_" + node.state.value, None, node.id, None, {"reason": node.reason})],
            )

        return await self._write(_tx)

    async def add_nodes(self, nodes: list[NodeRecord]) -> None:
        """Record nodes a provider is about to be asked for (state ``requested``).

        Written before the provider call, so a machine whose coordinator dies
        mid-call is known by id when the next coordinator takes inventory.
        """
        if not nodes:
            return

        def _tx(conn: Connection) -> Any:
            conn.execute(_n.insert(), [n.model_dump(mode="json") for n in nodes])
            self._events(
                conn,
                time.time(),
                [
                    ("node_" + n.state.value, None, n.id, None, {"provider": n.provider})
                    for n in nodes
                ],
            )

        return await self._write(_tx)

    async def set_node_state(
        self,
        node_id: str,
        state: NodeState,
        reason: str | None,
        now: float,
        *,
        address: str | None = None,
    ) -> NodeRecord | None:
        moved, refused = await self.set_node_states([(node_id, state, reason, address)], now)
        if refused:
            raise refused[0]
        return moved[0] if moved else None

    async def set_node_states(
        self, moves: list[tuple[str, NodeState, str | None, str | None]], now: float
    ) -> tuple[list[NodeRecord], list[InvalidTransition]]:
        """Move nodes ``(id, state, reason, address)`` in one transaction, one
        event per move; an illegal move is left out and returned, unknown ids
        are skipped."""

        def _tx(conn: Connection) -> Any:
            moved: list[NodeRecord] = []
            refused: list[InvalidTransition] = []
            events = []
            for node_id, state, reason, address in moves:
                row = conn.execute(sa.select(_n).where(_n.c.id == node_id)).first()
                if row is None:
                    continue
                old = NodeState(row.state)
                if state is NodeState.BOOTING and old not in (NodeState.REQUESTED,):
                    state = old  # it paired before its provider call returned: address only
                if old == state and address is None:
                    moved.append(_node_record(row))
                    continue
                try:
                    check_node_transition(node_id, old, state)
                except InvalidTransition as exc:
                    refused.append(exc)
                    continue
                values: dict[str, Any] = {"state": state.value, "last_seen": now}
                if reason is not None or not state.is_alive:
                    values["reason"] = None if reason is None else reason[:_TEXT]
                if address is not None:
                    values["address"] = address[:_TEXT]
                if state not in (NodeState.REQUESTED, NodeState.BOOTING):
                    values["deadline"] = None
                conn.execute(_n.update().where(_n.c.id == node_id).values(**values))
                if old != state:
                    data: dict[str, Any] = {"reason": reason, "from": old.value}
                    if address is not None:
                        data["address"] = address
                    events.append(("node_" + state.value, None, node_id, None, data))
                new = conn.execute(sa.select(_n).where(_n.c.id == node_id)).first()
                moved.append(_node_record(new))
            self._events(conn, now, events)
            return moved, refused

        return await self._write(_tx)

    async def node(self, node_id: str) -> NodeRecord | None:
        q = sa.select(_n).where(_n.c.id == node_id)

        def _tx(conn: Connection) -> Any:
            row = conn.execute(q).first()
            return None if row is None else _node_record(row)

        return await self._read(_tx)

    async def nodes(self, *, alive_only: bool = False) -> list[NodeRecord]:
        q = sa.select(_n).order_by(_n.c.created_at, _n.c.id)
        if alive_only:
            q = q.where(_n.c.state.notin_([NodeState.TERMINATED.value, NodeState.LOST.value]))

        def _tx(conn: Connection) -> Any:
            return [_node_record(r) for r in conn.execute(q)]

        return await self._read(_tx)

    async def touch_nodes(
        self, coordinator: str, node_ids: list[str], now: float, *, stale_before: float
    ) -> int:
        """``coordinator`` heard these nodes just now: one statement for all of them.

        Several coordinators on one store tell from ``last_seen`` and
        ``coordinator`` whether a node they do not serve is alive elsewhere.
        Left alone: a node recorded dead, and one that another coordinator
        heard since ``stale_before`` (it paired there; this session is a
        half-open leftover). Returns the rows touched.
        """
        if not node_ids:
            return 0
        dead = [NodeState.TERMINATED.value, NodeState.LOST.value]
        stmt = (
            _n.update()
            .where(
                _n.c.id.in_(sa.bindparam("ids", expanding=True)),
                _n.c.state.notin_(dead),
                sa.or_(
                    _n.c.coordinator.is_(None),
                    _n.c.coordinator == coordinator,
                    sa.func.coalesce(_n.c.last_seen, 0.0) < stale_before,
                ),
            )
            .values(last_seen=now, coordinator=coordinator)
        )

        def _tx(conn: Connection) -> int:
            return sum(
                conn.execute(stmt, {"ids": list(chunk)}).rowcount for chunk in _chunks(node_ids)
            )

        return await self._write(_tx)

    async def held_elsewhere(self, coordinator: str, heard_since: float) -> list[NodeRecord]:
        """Alive nodes whose session another coordinator holds, heard since ``heard_since``."""
        q = sa.select(_n).where(
            _n.c.state.notin_([NodeState.TERMINATED.value, NodeState.LOST.value]),
            _n.c.coordinator.is_not(None),
            _n.c.coordinator != coordinator,
            _n.c.last_seen >= heard_since,
        )

        def _tx(conn: Connection) -> list[NodeRecord]:
            return [_node_record(r) for r in conn.execute(q)]

        return await self._read(_tx)

    async def lose_nodes(
        self,
        now: float,
        reason: str,
        *,
        silent_before: float,
        node_ids: Collection[str] | None = None,
        held_by: str | None = None,
        exclude: Collection[str] = (),
    ) -> list[NodeRecord]:
        """Record as ``lost`` the paired nodes not heard since ``silent_before``, in
        one transaction whose conditions are checked on the rows it changes.

        ``node_ids`` narrows it to those nodes; ``held_by`` to nodes whose
        session that coordinator holds (or nobody does): a coordinator never
        declares lost a node that reconnected to another meanwhile. Nodes
        still booting are left to their boot timeout. Returns the nodes as
        they were; their leases are the caller's to requeue
        (:meth:`requeue_node`).
        """
        paired = [s.value for s in NodeState if s.is_alive and s not in _UNPAIRED_NODE_STATES]
        q = sa.select(_n).where(
            _n.c.state.in_(paired),
            sa.func.coalesce(_n.c.last_seen, _n.c.created_at) < silent_before,
        )
        if node_ids is not None:
            if not node_ids:
                return []
            q = q.where(_n.c.id.in_(list(node_ids)))
        if held_by is not None:
            q = q.where(sa.or_(_n.c.coordinator.is_(None), _n.c.coordinator == held_by))
        if not self.is_sqlite:
            q = q.with_for_update(skip_locked=True)  # one being re-paired now is not silent

        def _tx(conn: Connection) -> list[NodeRecord]:
            rows = [r for r in conn.execute(q) if r.id not in exclude]
            if not rows:
                return []
            conn.execute(
                _n.update()
                .where(_n.c.id.in_([r.id for r in rows]))
                .values(state=NodeState.LOST.value, reason=reason[:_TEXT], coordinator=None)
            )
            self._events(
                conn,
                now,
                [
                    ("node_lost", None, r.id, None, {"reason": reason, "from": r.state})
                    for r in rows
                ],
            )
            return [_node_record(r) for r in rows]

        return await self._write(_tx)

    async def add_event(
        self,
        action: str,
        now: float,
        *,
        task_id: str | None = None,
        node_id: str | None = None,
        lease_id: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        def _tx(conn: Connection) -> Any:
            self._events(conn, now, [(action, task_id, node_id, lease_id, data or {})])

        return await self._write(_tx)

    def _events(
        self,
        conn: Connection,
        now: float,
        rows: Iterable[tuple[str, str | None, str | None, str | None, dict[str, Any]]],
    ) -> None:
        batch = [
            {"at": now, "action": a, "task_id": t, "node_id": n, "lease_id": lid, "data": d}
            for a, t, n, lid, d in rows
        ]
        for chunk in _chunks(batch, 500):
            self._sql.run_many(conn, self._sql.insert_events, chunk)

    async def events(
        self, *, after: int = 0, task_id: str | None = None, limit: int = 100
    ) -> list[EventRecord]:
        q = sa.select(_e).where(_e.c.id > after).order_by(_e.c.id).limit(limit)
        if task_id is not None:
            q = q.where(_e.c.task_id == task_id)

        def _tx(conn: Connection) -> Any:
            return [
                EventRecord(
                    id=r.id,
                    at=r.at,
                    action=r.action,
                    task_id=r.task_id,
                    node_id=r.node_id,
                    lease_id=r.lease_id,
                    data=r.data or {},
                )
                for r in conn.execute(q)
            ]

        return await self._read(_tx)


def _refuse_waiting_on_services(specs: Sequence[TaskSpec], services: Collection[str]) -> None:
    """A task cannot depend on a service: a service never finishes, so it would wait forever."""
    if not services:
        return
    for s in specs:
        for dep in s.depends_on:
            if dep in services:
                raise SubmissionError(
                    f"task {s.id}: depends_on names service {dep}, which never finishes "
                    "(a service runs until it is cancelled)",
                    task_id=s.id,
                    service=dep,
                )


def _command_json(command: CommandSpec | None) -> dict[str, Any] | None:
    """A command as stored: fields left at their defaults are left out (100k tasks, 100k times)."""
    return None if command is None else command.model_dump(exclude_defaults=True, by_alias=True)


def _clip(text: str | None) -> str | None:
    """Fit agent-supplied text to its column.

    PostgreSQL rejects an overlong value, which would fail the whole cycle
    (every result and claim in it) again on each retry.
    """
    return text if text is None or len(text) <= _TEXT else text[: _TEXT - 3] + "..."


def _attempt_row(
    task_id: str,
    lease_id: str,
    attempt: int,
    node_id: str,
    row: Any,
    now: float,
    outcome: str,
    reason: str | None,
) -> dict[str, Any]:
    return {
        "lease_id": lease_id,
        "task_id": task_id,
        "attempt": attempt,
        "node_id": node_id,
        "leased_at": row.leased_at or now,
        "started_at": row.started_at,
        "ended_at": now,
        "outcome": outcome,
        "reason": reason,
        "error": None,
        "phases": None,
    }


def _in_transaction(engine: sa.Engine, fn: Callable[[Connection], T]) -> T:
    with engine.begin() as conn:
        return fn(conn)


def _sqlite_pragmas(engine: sa.Engine, *, begin: str | None = None) -> None:
    """WAL + ``synchronous=FULL``: a commit is on disk before it is acknowledged.

    ``begin``: what a transaction of ``engine.begin()`` starts with (the
    readers' ``BEGIN``); the writer sends its own (:class:`SqliteWriter`).
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    if begin is None:
        return

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(begin)


def _task_record(row: Any, depends_on: list[str]) -> TaskRecord:
    return TaskRecord(
        id=row.id,
        job_id=row.job_id,
        name=row.name,
        kind=row.kind,
        state=TaskState(row.state),
        priority=row.priority,
        attempt=row.attempt,
        max_attempts=row.max_attempts,
        timeout_s=row.timeout_s,
        labels=row.labels or {},
        depends_on=depends_on,
        node_id=row.node_id,
        lease_id=row.lease_id,
        reason=row.reason,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        command=CommandSpec.model_validate(row.command) if row.command else None,
        error=row.error,
        output=row.output,
        service=spec_of(row.service) if row.service else None,
        restarts=row.restarts or 0,
        release=row.release,
        **_placement(row.ckey),
    )


def _glob_to_like(pattern: str) -> str:
    """A name glob (``*``, ``?``) as a LIKE pattern, the LIKE wildcards escaped."""
    escaped = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def _averaged(points: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each key over the points that have it."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for p in points:
        for key, value in p.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def _placement(ckey: str) -> dict[str, Any]:
    """A task's selector and resources, read back from its placement key."""
    if not ckey or "\x1e" not in ckey:
        return {}
    c = parse_key(ckey)
    return {"select": str(c.select) if c.select else None, "resources": c.resources}


def _node_record(row: Any) -> NodeRecord:
    return NodeRecord(
        id=row.id,
        name=row.name,
        state=NodeState(row.state),
        provider=row.provider,
        labels=row.labels or {},
        slots=row.slots,
        host=row.host,
        pid=row.pid,
        created_at=row.created_at,
        last_seen=row.last_seen,
        reason=row.reason,
        address=row.address,
        deadline=row.deadline,
        data=row.data or {},
        resources=row.resources or {},
        paused=bool(row.paused),
    )
