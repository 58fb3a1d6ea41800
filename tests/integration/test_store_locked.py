"""A SQLite store whose file another process holds locked: no write waits twice.

Writes queue on the store's one write thread. The CI run of 2026-12-07 showed
the cost: with the file locked for 20 s, a submission queued behind the
coordinator's presence write waited for that one's busy timeout (10 s) and
then for its own, 20 s in all, where the fault suite allows one timeout.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

from herder.errors import StoreError
from herder.store.sql import SqlStore

BUSY_TIMEOUT_S = 10.0  # herder.store.sql's PRAGMA busy_timeout
HOLD_LOCK = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=30, isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(60)
"""


async def _timed_write(store: SqlStore, key: str) -> tuple[float, BaseException | None]:
    """Seconds until ``set_meta`` returned or raised, and what it raised."""
    started = time.monotonic()
    try:
        await store.set_meta(key, "v")
    except StoreError as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def test_a_write_queued_behind_a_failed_one_fails_with_it(tmp_path: Path) -> None:
    db = tmp_path / "herd.db"
    store = SqlStore(f"sqlite:///{db}")
    await store.open()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"locked"
        first = asyncio.create_task(_timed_write(store, "first"))
        await asyncio.sleep(0.3)
        second = asyncio.create_task(_timed_write(store, "second"))
        (first_s, first_error), (second_s, second_error) = await asyncio.wait_for(
            asyncio.gather(first, second), timeout=3 * BUSY_TIMEOUT_S
        )
        assert isinstance(first_error, StoreError)
        assert "locked" in str(first_error)
        assert first_s >= BUSY_TIMEOUT_S - 0.5, "the busy timeout is 10 s"
        # queued behind the first, it fails with it instead of waiting 10 s more
        assert isinstance(second_error, StoreError), "the second write waited out the lock"
        assert second_s <= BUSY_TIMEOUT_S + 1.0, f"the second write waited {second_s:.1f}s"
        assert "locked" in str(second_error)
        assert "queued before failed" in str(second_error)
        # a write queued after the failure waits on its own (briefly: the lock goes now)
        third = asyncio.create_task(_timed_write(store, "third"))
        await asyncio.sleep(0.3)
        holder.kill()
        holder.wait(10)
        _third_s, third_error = await asyncio.wait_for(third, timeout=2 * BUSY_TIMEOUT_S)
        assert third_error is None, f"a write after the lock went failed: {third_error}"
        assert await store.get_meta("third") == "v"
        assert await store.get_meta("first") is None
        assert await store.get_meta("second") is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
        await store.close()
