"""A coordinator frozen in the middle of a PostgreSQL transaction does not hold the
others up for longer than the store's idle-in-transaction limit.

In a CI run of 2026-12-07, test_agent_failover's SIGSTOP case failed so: the
surviving coordinator's pairing of both agents timed out (10 s) while the other
stayed stopped. A stopped coordinator whose open transaction holds their node
rows does exactly that without the limit (this test then waits its full 30 s).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

from herder.store.sql import SqlStore

IDLE_IN_TRANSACTION_S = 3.0  # herder.store.sql's _PG_SESSION_SETTINGS
# A real store in a process of its own, stopped (SIGSTOP, by itself) while its
# transaction holds the row of the meta key ``probe``.
FREEZE_MID_TRANSACTION = """
import asyncio, os, signal, sys
import sqlalchemy as sa
from herder.store import schema
from herder.store.sql import SqlStore

async def main():
    store = SqlStore(sys.argv[1])
    await store.open()
    def hold(conn):
        conn.execute(schema.meta.update().where(schema.meta.c.key == "probe").values(value="held"))
        print("locked", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    await store.write_transaction(hold)

asyncio.run(main())
"""


async def test_a_frozen_coordinators_locks_go_after_the_idle_limit(pg_url: str) -> None:
    store = SqlStore(pg_url)
    await store.open()
    await store.set_meta("probe", "before")
    frozen = subprocess.Popen(
        [sys.executable, "-c", FREEZE_MID_TRANSACTION, pg_url], stdout=subprocess.PIPE
    )
    try:
        assert frozen.stdout is not None
        assert frozen.stdout.readline().strip() == b"locked"
        started = time.monotonic()
        await asyncio.wait_for(store.set_meta("probe", "after"), timeout=30)
        waited = time.monotonic() - started
        assert await store.get_meta("probe") == "after"
        assert frozen.poll() is None  # still stopped: the server let its locks go, not it
    finally:
        frozen.send_signal(signal.SIGKILL)
        frozen.wait(timeout=10)
        if frozen.stdout is not None:
            frozen.stdout.close()
        await store.close()
    print(f"the write waited {waited:.2f}s for the frozen transaction")
    assert waited < IDLE_IN_TRANSACTION_S + 2.0
