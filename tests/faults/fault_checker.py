"""The fault suite's checker: what went in (the client's log) against what came out.

Three independent records are compared:

- the client's **submission log**: every id it tried to submit, and those the
  coordinator acknowledged (committed);
- the agents' **execution log** (``herder agent --exec-log``, see
  :mod:`herder.agent.execlog`), written outside the store: every attempt that
  started and ended, under which lease;
- the **store's final state**: the ``tasks`` and ``attempts`` tables.

From them it counts **lost** (acknowledged, never finished as expected),
**duplicated** (more than one recorded result), **unexpected** (a task or an
execution nobody submitted), **stale** (a result accepted under a lease that
was not the task's current one) and **re-executions**; and, for tasks with
dependencies, **early starts** (an execution that began before a dependency's
result was committed).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SubmissionLog:
    """What the client sent and what the coordinator acknowledged."""

    attempted: set[str] = field(default_factory=set)
    acknowledged: list[str] = field(default_factory=list)
    deps: dict[str, list[str]] = field(default_factory=dict)

    def sent(self, task_id: str, depends_on: list[str] | None = None) -> None:
        self.attempted.add(task_id)
        if depends_on:
            self.deps[task_id] = list(depends_on)

    def acked(self, task_ids: list[str]) -> None:
        self.acknowledged.extend(task_ids)


@dataclass(frozen=True)
class Execution:
    """One line of the execution log."""

    event: str
    task: str
    attempt: int
    lease: str
    node: str
    at: float
    state: str | None


def read_exec_log(path: Path) -> list[Execution]:
    """Every line the agents appended; a torn last line (an agent killed mid-write) is
    ignored, anything else malformed fails loudly."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            d = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                continue
            raise
        out.append(
            Execution(
                d["event"], d["task"], d["attempt"], d["lease"], d["node"], d["at"], d.get("state")
            )
        )
    return out


@dataclass
class Verdict:
    """The counts for one run; ``ok`` means nothing was lost, doubled, stale or early."""

    tasks: int
    lost: list[str]
    duplicated: list[str]
    unexpected: list[str]
    stale: list[str]
    early: list[str]
    reexecutions: int
    executions: int
    outcomes: dict[str, int]

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected or self.stale or self.early)

    def row(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "unexpected": len(self.unexpected),
            "stale": len(self.stale),
            "early": len(self.early),
            "reexecutions": self.reexecutions,
        }

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.row().items()]
        for name in ("lost", "duplicated", "unexpected", "stale", "early"):
            ids = getattr(self, name)
            if ids:
                parts.append(f"{name} e.g. {sorted(ids)[:5]}")
        return ", ".join(parts)


Store = Path | str
"""A store the checker reads: a SQLite file, or a ``postgresql://`` URL."""


def store_rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """The rows of one read-only query (plain SQL both dialects accept) on ``store``."""
    if isinstance(store, Path):
        conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=30)
        try:
            return list(conn.execute(sql))
        finally:
            conn.close()
    import asyncpg

    async def fetch() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(store, timeout=30)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()

    return asyncio.run(fetch())


def _store(store: Store) -> tuple[dict[str, tuple[str, str | None]], list[tuple[Any, ...]]]:
    tasks = {
        tid: (state, lease)
        for tid, state, lease in store_rows(store, "SELECT id, state, lease_id FROM tasks")
    }
    attempts = store_rows(
        store, "SELECT task_id, attempt, lease_id, outcome, leased_at FROM attempts"
    )
    return tasks, attempts


def check(
    db: Store,
    submissions: SubmissionLog,
    exec_log: Path,
    *,
    expect: str = "succeeded",
    expect_by_task: Mapping[str, str] | None = None,
) -> Verdict:
    """Compare the three records; ``expect`` is the state every acknowledged task must end
    in, unless ``expect_by_task`` names another for it."""
    tasks, attempts = _store(db)
    runs = read_exec_log(exec_log)
    wanted = expect_by_task or {}
    lost = [
        t
        for t in submissions.acknowledged
        if tasks.get(t, ("missing", None))[0] != wanted.get(t, expect)
    ]

    recorded: Counter[str] = Counter()
    latest: dict[str, int] = defaultdict(int)
    for task_id, attempt, _lease, _outcome, _at in attempts:
        latest[task_id] = max(latest[task_id], attempt)
    stale = set()
    for task_id, attempt, lease, outcome, _at in attempts:
        if outcome == "succeeded":
            recorded[task_id] += 1
            # a result is only accepted under the task's current lease: nothing after it
            current = tasks.get(task_id, (None, None))[1]
            if attempt != latest[task_id] or (current is not None and current != lease):
                stale.add(task_id)
    duplicated = [t for t, n in recorded.items() if n > 1]

    unexpected = {t for t in tasks if t not in submissions.attempted}
    unexpected |= {r.task for r in runs if r.task not in submissions.attempted}

    starts = [r for r in runs if r.event == "start"]
    per_task = Counter(r.task for r in starts)
    reexecutions = sum(n - 1 for n in per_task.values())

    # a dependent may start only after each dependency's successful run ended
    done_at = {r.task: r.at for r in runs if r.event == "end" and r.state == "succeeded"}
    early = set()
    for r in starts:
        for dep in submissions.deps.get(r.task, []):
            if dep not in done_at or r.at < done_at[dep]:
                early.add(r.task)
    outcomes = Counter(state for state, _ in tasks.values())
    return Verdict(
        tasks=len(submissions.acknowledged),
        lost=lost,
        duplicated=duplicated,
        unexpected=sorted(unexpected),
        stale=sorted(stale),
        early=sorted(early),
        reexecutions=reexecutions,
        executions=len(starts),
        outcomes=dict(outcomes),
    )
