"""The claim's ready-task pick on PostgreSQL, with the state bound and with it written in.

Raw asyncpg against a real store's schema: 1,000 ready tasks, then 600
claims of 10 (``UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)``,
one prepared statement), each followed by 10 new tasks so that the ready
count stays put. Prints the claims' p50 and the plan of one more, with its
buffers. ``herder.store.statements.indexed_state`` keeps the state bound on
PostgreSQL because ``bench/claims.py`` (the whole store's claim) measured
it slower written in at 1,000 ready; this measures the statement alone.

Run: ``.venv/bin/python bench/pg_claim_forms.py`` (``HERDER_TEST_PG`` or
postgresql://postgres@127.0.0.1:5432/test, where a database is made and dropped
per form). It alternates the forms ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time

import asyncpg

from herder.model import TaskSpec, new_id
from herder.store.sql import SqlStore

PG = os.environ.get("HERDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
PICK = {
    "bound": (
        "SELECT id FROM tasks WHERE state = $1 AND ckey = $2 "
        "ORDER BY priority DESC, seq LIMIT $3 FOR UPDATE SKIP LOCKED",
        ("ready", "", 10),
    ),
    "written": (
        "SELECT id FROM tasks WHERE state = 'ready' AND ckey = $1 "
        "ORDER BY priority DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED",
        ("", 10),
    ),
}
CLAIM = (
    "UPDATE tasks SET state = 'leased', node_id = 'n1', attempt = attempt + 1 WHERE id IN ({pick})"
)


def _specs(count: int) -> list[TaskSpec]:
    return [TaskSpec(id=new_id("t"), kind="call", name="n", payload=b"x") for _ in range(count)]


async def measure(form: str, claims: int) -> tuple[float, list[str]]:
    """p50 ms of ``claims`` claims with the pick in ``form``; the plan of one more."""
    db = "bench_" + secrets.token_hex(4)
    base = PG.rsplit("/", 1)[0]
    admin = await asyncpg.connect(PG)
    await admin.execute(f"CREATE DATABASE {db}")
    try:
        store = SqlStore(f"{base}/{db}")
        await store.open()
        await store.submit("j", None, _specs(1000), 1.0)
        conn = await asyncpg.connect(f"{base}/{db}")
        pick, args = PICK[form]
        claim = await conn.prepare(CLAIM.format(pick=pick))
        took = []
        for _ in range(claims):
            started = time.perf_counter()
            await claim.fetch(*args)
            took.append(time.perf_counter() - started)
            await store.submit("j", None, _specs(10), 2.0)
        took.sort()
        literal = CLAIM.format(pick=PICK["written"][0]).replace("$1", "''").replace("$2", "10")
        async with conn.transaction():
            plan = [r[0] for r in await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + literal)]
        await conn.close()
        await store.close()
        return took[len(took) // 2] * 1e3, plan
    finally:
        await admin.execute(f"DROP DATABASE {db} WITH (FORCE)")
        await admin.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--claims", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    for _ in range(args.rounds):
        for form in PICK:
            p50, plan = await measure(form, args.claims)
            at = next((i for i, line in enumerate(plan) if "Index Scan" in line), None)
            scan = (
                "no index scan"
                if at is None
                else " ".join(
                    line.strip()
                    for line in plan[at : at + 3]
                    if "Scan" in line or "Buffers" in line
                )
            )
            print(f"{form:8} claim p50 {p50:6.3f} ms; the next claim: {scan}")


if __name__ == "__main__":
    asyncio.run(main())
