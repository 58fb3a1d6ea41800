"""PostgreSQL's planner statistics follow the queue as submissions grow it.

asyncpg prepares every statement, and PostgreSQL keeps a generic plan chosen
on an empty table (a sequential scan) until the table is analyzed. With
autovacuum off, as on this machine's server, a million-task fill became
quadratic. The store analyzes the tables itself; these tests hold it to that.
"""

from __future__ import annotations

import asyncpg
import pytest

from herder.model import TaskSpec
from herder.store.sql import SqlStore


def batch(start: int, count: int) -> list[TaskSpec]:
    return [
        TaskSpec(id=f"t-{i:06d}", kind="call", payload=b"x") for i in range(start, start + count)
    ]


async def analyzed(url: str) -> tuple[int, int]:
    """How many times ``tasks`` was analyzed, and its row estimate."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT analyze_count + autoanalyze_count AS n, c.reltuples AS rows "
            "FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid "
            "WHERE s.relname = 'tasks'"
        )
    finally:
        await conn.close()
    assert row is not None
    return int(row["n"]), int(row["rows"])


async def test_growing_the_queue_refreshes_the_statistics(pg_url: str) -> None:
    store = SqlStore(pg_url)
    await store.open()
    try:
        for start in range(0, 8_000, 2_000):  # below the threshold: no analyze yet
            await store.submit("j-small", None, batch(start, 2_000), now=1.0)
        assert (await analyzed(pg_url))[0] == 0
        await store.submit("j-small", None, batch(8_000, 2_000), now=1.0)
        assert await analyzed(pg_url) == (1, 10_000)
        # the next waits for 10,000 more rows (a fifth of the table, once that is more)
        await store.submit("j-small", None, batch(10_000, 9_000), now=1.0)
        assert (await analyzed(pg_url))[0] == 1
        await store.submit("j-small", None, batch(19_000, 1_000), now=1.0)
        assert await analyzed(pg_url) == (2, 20_000)
    finally:
        await store.close()


async def test_a_refused_batch_does_not_count_as_growth(pg_url: str) -> None:
    store = SqlStore(pg_url)
    await store.open()
    try:
        await store.submit("j-a", None, batch(0, 9_999), now=1.0)
        with pytest.raises(Exception, match="appears twice"):
            await store.submit("j-a", None, batch(20_000, 5) * 2, now=1.0)
        assert (await analyzed(pg_url))[0] == 0
    finally:
        await store.close()
