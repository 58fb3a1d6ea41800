"""The SQLite store's cost per round of workload B: submit and lease one task, then
record its start and result (two transactions, two fsyncs), in one process.

Three ways, alternating, in the same run:

- ``driver``: the store as shipped; its hot statements run on the driver
  (:mod:`herder.store.prepared`);
- ``sqlalchemy``: the same store with those statements run by SQLAlchemy Core
  (what the store did before; its ``HotStatements`` told it is not SQLite);
- ``floor``: the same statements written by hand on ``sqlite3``, with none
  of the store's checks and bookkeeping: what SQLite itself costs.

Prints wall and user/system CPU microseconds per round (median of
``--repeat``) and writes ``bench/results-store-round.json``.
Run: ``.venv/bin/python bench/store_round.py [--rounds 2000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle

from herder.model import TaskSpec, TaskState, new_id
from herder.store.base import ClaimRequest, Submission, TaskResult
from herder.store.sql import SqlStore

HERE = Path(__file__).parent
PAYLOAD = cloudpickle.dumps((len, ([],), {}))
WARMUP = 200


async def store_rounds(path: Path, rounds: int, *, through_sqlalchemy: bool) -> dict[str, float]:
    store = SqlStore(f"sqlite:///{path}")
    await store.open()
    if through_sqlalchemy:
        store._sql.is_sqlite = False  # rows/run/run_many take SQLAlchemy's path
    try:

        async def one() -> None:
            spec = TaskSpec(id=new_id("t"), kind="call", name="noop", payload=PAYLOAD)
            _, claimed, _ = await store.cycle(
                submissions=[Submission(new_id("j"), None, [spec])],
                claims=[ClaimRequest("n1", [spec.constraint_key()], 1)],
                now=time.time(),
            )
            c = claimed["n1"][0]
            now = time.time()
            result = TaskResult(
                c.task_id, c.lease_id, TaskState.SUCCEEDED, b"r", started_at=now, ended_at=now
            )
            await store.cycle(started=[(c.task_id, c.lease_id)], results=[result], now=now)

        return await _timed(one, rounds)
    finally:
        await store.close()


async def floor_rounds(path: Path, rounds: int) -> dict[str, float]:
    """The statements of a round by hand (the schema made by the store itself)."""
    store = SqlStore(f"sqlite:///{path}")
    await store.open()
    await store.close()
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    thread = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()

    def lease(tid: str, jid: str, now: float) -> str:
        db.execute("BEGIN IMMEDIATE")
        db.execute("SELECT id FROM tasks WHERE id = ?", (tid,)).fetchall()
        db.execute("INSERT INTO jobs (id, created_at) VALUES (?, ?)", (jid, now))
        db.execute(
            "INSERT INTO tasks (id, seq, job_id, name, kind, state, priority, attempt, "
            "max_attempts, ckey, labels, payload, n_deps, pending_deps, run_on_failure, "
            "has_dependents, created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                tid,
                time.time_ns(),
                jid,
                "noop",
                "call",
                "ready",
                0,
                0,
                3,
                "",
                "{}",
                PAYLOAD,
                0,
                0,
                0,
                0,
                now,
            ),
        )
        (lease_id,) = db.execute(
            "UPDATE tasks SET state='leased', node_id=?, attempt=attempt+1, "
            "lease_id=lower(hex(randomblob(8))), leased_at=? WHERE id IN (SELECT id FROM tasks "
            "WHERE state='ready' AND ckey='' ORDER BY priority DESC, seq LIMIT 1) "
            "RETURNING lease_id, payload",
            ("n1", now),
        ).fetchone()[:1]
        db.execute("UPDATE jobs SET started_at=? WHERE id=? AND started_at IS NULL", (now, jid))
        db.execute("COMMIT")
        return str(lease_id)

    def finish(tid: str, lid: str, now: float) -> None:
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "UPDATE tasks SET state='running', started_at=? WHERE id=? AND lease_id=?",
            (now, tid, lid),
        )
        db.execute("SELECT state, attempt FROM tasks WHERE id=?", (tid,)).fetchall()
        db.execute(
            "UPDATE tasks SET state='succeeded', result=?, finished_at=? WHERE id=? AND lease_id=?",
            (b"r", now, tid, lid),
        )
        db.execute(
            "INSERT INTO attempts (lease_id, task_id, attempt, node_id, leased_at, ended_at, "
            "outcome) VALUES (?,?,?,?,?,?,?)",
            (lid, tid, 1, "n1", now, now, "succeeded"),
        )
        db.execute("COMMIT")

    async def one() -> None:
        tid = new_id("t")
        lid = await loop.run_in_executor(thread, lease, tid, new_id("j"), time.time())
        await loop.run_in_executor(thread, finish, tid, lid, time.time())

    try:
        return await _timed(one, rounds)
    finally:
        thread.shutdown()
        db.close()


async def _timed(one: Callable[[], Awaitable[None]], rounds: int) -> dict[str, float]:
    for _ in range(WARMUP):
        await one()
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(rounds):
        await one()
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "wall_us": 1e6 * wall / rounds,
        "user_us": 1e6 * (after.ru_utime - before.ru_utime) / rounds,
        "sys_us": 1e6 * (after.ru_stime - before.ru_stime) / rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {"driver": [], "sqlalchemy": [], "floor": []}
    with tempfile.TemporaryDirectory(prefix="herder-store-round-") as tmp:
        for r in range(args.repeat):
            for way in runs:
                path = Path(tmp) / f"{way}-{r}.db"
                if way == "floor":
                    out = asyncio.run(floor_rounds(path, args.rounds))
                else:
                    sa_path = way == "sqlalchemy"
                    out = asyncio.run(store_rounds(path, args.rounds, through_sqlalchemy=sa_path))
                runs[way].append(out)
                print(
                    f"run {r + 1} {way:10s} " + "  ".join(f"{k} {v:7.0f}" for k, v in out.items())
                )
    medians = {
        way: {k: round(statistics.median(o[k] for o in outs), 1) for k in outs[0]}
        for way, outs in runs.items()
    }
    ratios = {
        "driver/sqlalchemy wall": medians["driver"]["wall_us"] / medians["sqlalchemy"]["wall_us"],
        "driver/sqlalchemy user": medians["driver"]["user_us"] / medians["sqlalchemy"]["user_us"],
        "driver/floor wall": medians["driver"]["wall_us"] / medians["floor"]["wall_us"],
    }
    print("medians (us per round):", json.dumps(medians))
    print("ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))
    out_path = HERE / "results-store-round.json"
    out_path.write_text(
        json.dumps(
            {"rounds": args.rounds, "repeat": args.repeat, "medians": medians, "ratios": ratios},
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
