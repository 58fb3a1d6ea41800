"""The fault suite's own parts: the checker counts what it should, a seed replays.

The store here is a small SQLite file with the columns the checker reads,
written by hand so that each kind of anomaly is present exactly once.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from pathlib import Path

from tests.faults.fault_checker import SubmissionLog, check
from tests.faults.fault_suite import schedule


def make_store(
    db: Path, tasks: list[tuple[str, str, str | None]], attempts: list[tuple[str, int, str, str]]
) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE tasks (id TEXT, state TEXT, lease_id TEXT)")
    conn.execute(
        "CREATE TABLE attempts (task_id TEXT, attempt INT, lease_id TEXT, outcome TEXT, "
        "leased_at REAL)"
    )
    conn.executemany("INSERT INTO tasks VALUES (?, ?, ?)", tasks)
    conn.executemany("INSERT INTO attempts VALUES (?, ?, ?, ?, 0)", attempts)
    conn.commit()
    conn.close()


def line(event: str, task: str, lease: str, at: float, state: str | None = None) -> str:
    return json.dumps(
        {"event": event, "task": task, "attempt": 1, "lease": lease, "node": "n", "pid": 1,
         "at": at, **({"state": state} if state else {})}
    )  # fmt: skip


def test_the_checker_counts_each_anomaly(tmp_path: Path) -> None:
    make_store(
        tmp_path / "herd.db",
        tasks=[
            ("ok", "succeeded", "l-ok"),
            ("lost", "ready", None),
            ("dup", "succeeded", "l-dup2"),
            ("stale", "succeeded", "l-stale2"),
            ("dep", "succeeded", "l-dep"),
            ("ghost", "succeeded", "l-ghost"),
        ],
        attempts=[
            ("ok", 1, "l-ok", "succeeded"),
            ("dup", 1, "l-dup1", "succeeded"),
            ("dup", 2, "l-dup2", "succeeded"),
            ("stale", 1, "l-stale1", "succeeded"),  # accepted, yet a later lease exists
            ("stale", 2, "l-stale2", "lost"),
            ("dep", 1, "l-dep", "succeeded"),
        ],
    )
    (tmp_path / "exec.log").write_text(
        "\n".join(
            [
                line("start", "ok", "l-ok", 1.0),
                line("end", "ok", "l-ok", 5.0, "succeeded"),
                line("start", "dep", "l-dep", 4.0),  # before its dependency "ok" ended
                line("start", "dup", "l-dup1", 1.0),
                line("start", "dup", "l-dup2", 2.0),
                '{"event": "start", "task": "to',  # torn by a kill: ignored
            ]
        )
    )
    log = SubmissionLog()
    for task in ("ok", "lost", "dup", "stale"):
        log.sent(task)
    log.sent("dep", ["ok"])
    log.acked(["ok", "lost", "dup", "stale", "dep"])
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    assert verdict.lost == ["lost"]
    assert verdict.duplicated == ["dup"]
    assert verdict.stale == ["dup", "stale"]  # a second result is under an old lease too
    assert verdict.unexpected == ["ghost"]
    assert verdict.early == ["dep"]
    assert verdict.reexecutions == 1
    assert not verdict.ok


def test_a_seed_replays_the_same_schedule() -> None:
    first = schedule(1234, ["kill9", "stop"], 50, every_s=5)
    assert schedule(1234, ["kill9", "stop"], 50, every_s=5) == first
    assert schedule(1235, ["kill9", "stop"], 50, every_s=5) != first
    assert all(2.5 <= b.offset_s - a.offset_s <= 7.5 for a, b in itertools.pairwise(first))
