"""Durable throughput of no-op tasks with 1, 2 and 3 coordinators on PostgreSQL, and 1 on SQLite.

The same agents and slots every time (``--agents`` agents of ``--slots``
slots, split evenly across the coordinators, each agent joined to one);
each coordinator is handed an equal share of the tasks through its own
client, in batches. Throughput is tasks / seconds from the first submission
until the store records the last task succeeded (durable: counted from the
store's tasks table, not from client futures). A warm-up job runs first on
each setup. Writes ``bench/results-coordinators.json``.

Run when the machine is quiet: ``.venv/bin/python bench/coordinators.py
[--quick]`` (``HERDER_TEST_PG`` names the PostgreSQL server, default
``postgresql://postgres@127.0.0.1:5432/test``; a scratch database is made
and dropped for each setup).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cloudpickle

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests.cluster: the same launcher the tests use

from herder.client import Client  # noqa: E402
from herder.model import TaskSpec, new_id  # noqa: E402
from tests.cluster import coordinators  # noqa: E402

PG_ADMIN_URL = os.environ.get("HERDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BATCH = 2000
RUN_LIMIT_S = 600.0


def noop(x: int = 0) -> int:
    """The task: nothing but the dispatch."""
    return x


def _pg_exec(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


def _pg_count(url: str, sql: str) -> int:
    import asyncpg

    async def run() -> int:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    return asyncio.run(run())


@contextmanager
def store(kind: str, root: Path) -> Iterator[tuple[str, Callable[[str], int]]]:
    """A fresh store URL, and how to count rows in it."""
    if kind == "sqlite":
        path = root / "herd.db"

        def count(sql: str) -> int:
            conn = sqlite3.connect(path, timeout=10)
            try:
                return int(conn.execute(sql).fetchone()[0])
            finally:
                conn.close()

        yield f"sqlite:///{path}", count
        return
    name = f"herder_bench_{secrets.token_hex(4)}"
    _pg_exec(f"CREATE DATABASE {name}")
    url = f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    try:
        yield url, lambda sql: _pg_count(url, sql)
    finally:
        _pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def specs(n: int) -> list[TaskSpec]:
    return [
        TaskSpec(
            id=new_id("t"),
            kind="call",
            name="noop",
            payload=cloudpickle.dumps((noop, (i,), {})),
            max_attempts=3,
        )
        for i in range(n)
    ]


def wait_count(count: Callable[[str], int], sql: str, want: int, what: str) -> None:
    deadline = time.monotonic() + RUN_LIMIT_S
    while count(sql) < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done within {RUN_LIMIT_S:.0f}s")
        time.sleep(0.05)


def run_job(clients: list[Client], tasks: int, count: Any) -> float:
    """Submit ``tasks`` split across the clients (one thread each); tasks per second
    until the store holds them all succeeded."""
    done_before = count("SELECT count(*) FROM tasks WHERE state = 'succeeded'")
    shares = [tasks // len(clients)] * len(clients)
    shares[0] += tasks - sum(shares)
    made = [specs(n) for n in shares]
    errors: list[BaseException] = []

    def push(client: Client, batch: list[TaskSpec]) -> None:
        try:
            for start in range(0, len(batch), BATCH):
                client.push(batch[start : start + BATCH])
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=push, args=(c, b), name=f"push-{i}")
        for i, (c, b) in enumerate(zip(clients, made, strict=True))
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT_S)
    if errors:
        raise errors[0]
    wait_count(
        count,
        "SELECT count(*) FROM tasks WHERE state = 'succeeded'",
        done_before + tasks,
        f"{tasks} tasks",
    )
    return tasks / (time.perf_counter() - t0)


@contextmanager
def logs_kept_on_failure(root: Path, name: str) -> Iterator[None]:
    """On an error, copy every log under ``root`` to ``bench/artifacts/<name>`` first
    (``root`` is a temporary directory, gone once the error has unwound)."""
    try:
        yield
    except BaseException:
        kept = HERE / "artifacts" / name
        shutil.rmtree(kept, ignore_errors=True)
        for log in root.rglob("*.log"):
            target = kept / log.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(log, target)
        print(f"{name} failed; its logs are in {kept}", file=sys.stderr, flush=True)
        raise


def measure(kind: str, n_coord: int, args: argparse.Namespace) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="herder-bench-") as tmp,
        store(kind, Path(tmp)) as (url, count),
        logs_kept_on_failure(Path(tmp), f"coordinators-{kind}-{n_coord}"),
        coordinators(Path(tmp), url, n_coord) as group,
    ):
        group.start(*range(n_coord))
        for a in range(args.agents):
            group.start_agent(a % n_coord, slots=args.slots)
        wait_count(
            count,
            "SELECT count(*) FROM nodes WHERE state IN ('ready', 'busy')",
            args.agents,
            "agents",
        )
        clients = [Client(env=group.env(i)) for i in range(n_coord)]
        try:
            run_job(clients, args.warmup, count)
            load = os.getloadavg()[0]
            rates = [run_job(clients, args.tasks, count) for _ in range(args.repeat)]
        finally:
            for client in clients:
                client.close()
    rates.sort()
    return {
        "store": kind,
        "coordinators": n_coord,
        "tasks_per_s": rates[len(rates) // 2],
        "runs": rates,
        "load_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 tasks, one run")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--agents", type=int, default=6)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=500)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.repeat = min(args.tasks, 5000), 1
    setups = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2), ("postgresql", 3)]
    results = []
    for kind, n in setups:
        row = measure(kind, n, args)
        print(
            f"{kind:10} {n} coordinator(s): {row['tasks_per_s']:8.0f} tasks/s "
            f"(runs {', '.join(f'{r:.0f}' for r in row['runs'])}; load {row['load_before']:.1f})",
            flush=True,
        )
        results.append(row)
    out = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sizes": {
            "tasks": args.tasks,
            "repeat": args.repeat,
            "agents": args.agents,
            "slots": args.slots,
            "warmup": args.warmup,
        },
        "results": results,
    }
    (HERE / "results-coordinators.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
