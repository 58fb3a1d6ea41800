"""Claim latency with 1,000,000 ready tasks in the table, against 1,000, in one run.

For each store (SQLite file, PostgreSQL database) and each size, a fresh
store is filled through ``store.submit`` in batches of 50,000 (one job),
then ``--claims`` claims of ``--limit`` tasks each are timed one by one
(``store.claim``: one transaction, committed, as the coordinator claims for a
node). After each timed claim, as many new tasks are submitted (untimed), so
the ready count stays at the size under test, as in a queue in steady state.
p50/p99 of the claims; the ratio to the small table says whether a claim
stays O(log n) (``ix_tasks_ready``, a partial index of ready tasks).

Writes ``bench/results-claims.json``. Run: ``.venv/bin/python bench/claims.py``
(``--quick``: 20,000 instead of 1,000,000). PostgreSQL: ``HERDER_TEST_PG``
or postgresql://postgres@127.0.0.1:5432/test, where a database is made and
dropped per store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.table import Table

from herder.model import TaskSpec
from herder.store.sql import SqlStore

HERE = Path(__file__).parent
PG_ADMIN = os.environ.get("HERDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
FILL_BATCH = 50_000
console = Console()


def specs(start: int, stop: int) -> list[TaskSpec]:
    return [TaskSpec(id=f"t-{i:08d}", kind="call", payload=b"x") for i in range(start, stop)]


@asynccontextmanager
async def fresh_store(backend: str, tmp: Path) -> AsyncIterator[SqlStore]:
    """A new, empty store of that backend, dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp / f'claims-{secrets.token_hex(4)}.db'}"
        name = None
    else:
        name = f"herder_bench_{secrets.token_hex(4)}"
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f"CREATE DATABASE {name}")
        await admin.close()
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    store = SqlStore(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()
        if name is not None:
            admin = await asyncpg.connect(PG_ADMIN)
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await admin.close()


async def measure(backend: str, ready: int, claims: int, limit: int, tmp: Path) -> dict[str, Any]:
    async with fresh_store(backend, tmp) as store:
        started = time.perf_counter()
        for start in range(0, ready, FILL_BATCH):
            await store.submit("j-fill", "fill", specs(start, min(ready, start + FILL_BATCH)), 1.0)
        fill_s = time.perf_counter() - started
        if backend == "postgresql":

            def analyze(conn: Any) -> None:
                conn.exec_driver_sql("ANALYZE")

            await store.write_transaction(analyze)  # what autovacuum does after a bulk load
        latencies = []
        next_id = ready
        for _ in range(claims):
            t0 = time.perf_counter()
            got = await store.claim("n-bench", [""], limit, time.time())
            latencies.append(time.perf_counter() - t0)
            assert len(got) == limit, len(got)
            await store.submit("j-fill", "fill", specs(next_id, next_id + limit), time.time())
            next_id += limit
        counts = await store.counts()
    latencies.sort()
    return {
        "ready": ready,
        "ready_after": counts.get("ready", 0),
        "fill_s": round(fill_s, 1),
        "claims": claims,
        "limit": limit,
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 3),
        "max_ms": round(latencies[-1] * 1000, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready", type=int, default=1_000_000, help="ready tasks, large table")
    parser.add_argument("--baseline", type=int, default=1_000, help="ready tasks, small table")
    parser.add_argument("--claims", type=int, default=1000, help="timed claims per store")
    parser.add_argument("--limit", type=int, default=10, help="tasks per claim")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--quick", action="store_true", help="20,000 ready tasks, 300 claims")
    args = parser.parse_args()
    if args.quick:
        args.ready, args.claims = 20_000, 300
    results: dict[str, Any] = {
        "machine": f"{platform.node()} {platform.machine()} python {platform.python_version()}",
        "load_before": os.getloadavg(),
        "command": "bench/claims.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "quick"),
    }
    table = Table("store", "ready", "fill", "claim p50", "claim p99", "max")
    with tempfile.TemporaryDirectory(prefix="herder-bench-claims-") as name:
        for backend in args.backends.split(","):
            results[backend] = {}
            for ready in (args.baseline, args.ready):
                got = asyncio.run(measure(backend, ready, args.claims, args.limit, Path(name)))
                results[backend][str(ready)] = got
                table.add_row(
                    backend,
                    f"{ready:,}",
                    f"{got['fill_s']} s",
                    f"{got['p50_ms']} ms",
                    f"{got['p99_ms']} ms",
                    f"{got['max_ms']} ms",
                )
                console.print(f"{backend} {ready:,}: {got}")
    results["load_after"] = os.getloadavg()
    console.print(table)
    (HERE / "results-claims.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
