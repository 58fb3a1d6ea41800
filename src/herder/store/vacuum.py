"""``herder db vacuum``: forget finished tasks older than a cutoff, in small batches.

Each batch is its own short write transaction: the oldest finished tasks
(``ix_tasks_finished``), read in ``(finished_at, id)`` order from a cursor,
are optionally written to an archive as JSON lines (flushed to disk before the
batch commits: a task is never deleted unarchived, though a failed commit may
archive it twice), then deleted with their attempts and their own dependency
edges; jobs left with no task go too. Between batches the store's lock is free,
so a coordinator sharing it keeps serving: after each batch the vacuum waits
as long as the batch took (SQLite's writer lock is not fair: a waiting writer
polls, and one that re-takes the lock at once could starve it).

A finished task that an unfinished task still depends on is kept (its
result feeds that task). Events and telemetry samples are left alone: they
are the herd's history, with retention of their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
from dataclasses import dataclass, fields
from functools import partial
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.model import FINAL_TASK_STATES
from herder.store import schema
from herder.store.sql import SqlStore
from herder.store.statements import state_is

MAX_BATCH = 5000  # ids per statement stay under both dialects' parameter limits
_FINAL = sorted(s.value for s in FINAL_TASK_STATES)
_BINARY = ("payload", "result", "error_pickle")  # base64 in the archive
_t = schema.tasks
_d = schema.deps
_a = schema.attempts
_j = schema.jobs


@dataclass
class VacuumReport:
    """What a vacuum did, summed over its batches."""

    tasks: int = 0
    attempts: int = 0
    deps: int = 0
    jobs: int = 0
    archived: int = 0
    kept_for_dependents: int = 0  # finished and old enough, but an unfinished task needs it
    batches: int = 0

    def add(self, other: VacuumReport) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


async def vacuum(
    store: SqlStore,
    before: float,
    *,
    batch: int = 1000,
    archive: IO[str] | None = None,
    pause_s: float = 0.01,
) -> VacuumReport:
    """Delete (after archiving to ``archive``, if given) tasks finished before ``before``."""
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {MAX_BATCH}, not {batch}")
    report = VacuumReport()
    cursor: tuple[float, str] | None = None
    while True:
        started = time.monotonic()
        step, scanned, cursor = await store.write_transaction(
            partial(_batch, before=before, after=cursor, limit=batch, archive=archive)
        )
        report.add(step)
        if scanned < batch or cursor is None:
            return report
        # at most half the store's write time: others' writers get their turn
        await asyncio.sleep(max(pause_s, time.monotonic() - started))


def oldest_finished(before: float, after: tuple[float, str] | None, limit: int) -> sa.Select[Any]:
    """The next ``limit`` tasks finished before ``before``, after the cursor ``after``.

    Read off ``ix_tasks_finished``: the state test is wrapped (``state_is``) so
    that no planner walks every succeeded task by the state index instead
    and sorts them; the plain ``>=`` bound keeps the range scan on the index
    while the ``OR`` orders ties by id.
    """
    q = sa.select(_t).where(_t.c.finished_at < before, state_is(*_FINAL))
    if after is not None:
        q = q.where(
            _t.c.finished_at >= after[0],
            sa.or_(
                _t.c.finished_at > after[0],
                sa.and_(_t.c.finished_at == after[0], _t.c.id > after[1]),
            ),
        )
    return q.order_by(_t.c.finished_at, _t.c.id).limit(limit)


def still_needed(ids: list[str]) -> sa.Select[Any]:
    """Which of ``ids`` an unfinished task depends on: their edges by ``ix_deps_dep``,
    each dependent's state by its primary key."""
    dependent = _t.alias("dependent")
    return (
        sa.select(_d.c.dep_id)
        .join(dependent, dependent.c.id == _d.c.task_id)
        .where(_d.c.dep_id.in_(ids), dependent.c.state.notin_(_FINAL))
        .distinct()
    )


def _batch(
    conn: Connection,
    before: float,
    after: tuple[float, str] | None,
    limit: int,
    archive: IO[str] | None,
) -> tuple[VacuumReport, int, tuple[float, str] | None]:
    """One batch: returns what it did, the rows it looked at and the next cursor."""
    q = oldest_finished(before, after, limit)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update(skip_locked=True)
    rows = conn.execute(q).mappings().all()
    if not rows:
        return VacuumReport(batches=1), 0, None
    cursor = (rows[-1]["finished_at"], rows[-1]["id"])
    needed = set(conn.execute(still_needed([r["id"] for r in rows])).scalars())
    gone = [r for r in rows if r["id"] not in needed]
    report = VacuumReport(kept_for_dependents=len(rows) - len(gone), batches=1)
    if not gone:
        return report, len(rows), cursor
    ids = [r["id"] for r in gone]
    if archive is not None:
        _archive(conn, gone, ids, archive)
        report.archived = len(gone)
    report.attempts = conn.execute(_a.delete().where(_a.c.task_id.in_(ids))).rowcount
    report.deps = conn.execute(_d.delete().where(_d.c.task_id.in_(ids))).rowcount
    report.tasks = conn.execute(_t.delete().where(_t.c.id.in_(ids))).rowcount
    job_ids = sorted({r["job_id"] for r in gone})
    has_tasks = sa.exists().where(_t.c.job_id == _j.c.id)
    report.jobs = conn.execute(_j.delete().where(_j.c.id.in_(job_ids), ~has_tasks)).rowcount
    return report, len(rows), cursor


def _archive(conn: Connection, rows: list[Any], ids: list[str], out: IO[str]) -> None:
    """One JSON line per task: its row (binary columns base64), edges and attempts."""
    deps: dict[str, list[str]] = {}
    for task_id, dep_id in conn.execute(
        sa.select(_d.c.task_id, _d.c.dep_id).where(_d.c.task_id.in_(ids))
    ):
        deps.setdefault(task_id, []).append(dep_id)
    attempts: dict[str, list[dict[str, Any]]] = {}
    for a in conn.execute(
        sa.select(_a).where(_a.c.task_id.in_(ids)).order_by(_a.c.leased_at)
    ).mappings():
        attempts.setdefault(a["task_id"], []).append(dict(a))
    for row in rows:
        task = dict(row)
        for name in _BINARY:
            if task[name] is not None:
                task[name] = base64.b64encode(task[name]).decode()
        line = {
            "task": task,
            "depends_on": deps.get(row["id"], []),
            "attempts": attempts.get(row["id"], []),
        }
        out.write(json.dumps(line, separators=(",", ":")) + "\n")
    out.flush()
    os.fsync(out.fileno())
