"""The leader lock on a real PostgreSQL: one holder, and a takeover when its session ends."""

from __future__ import annotations

import asyncio
import time

from herder.coordinator.leader import Leadership, current_leader
from herder.store.cluster import SoleLock, pg_dsn
from herder.store.pg_cluster import SessionLock
from herder.store.sql import SqlStore


class Candidate:
    """A Leadership whose work records when it ran and waits to be cancelled."""

    def __init__(self, url: str, store: SqlStore, name: str) -> None:
        dsn = pg_dsn(url)
        assert dsn is not None
        self.lock = SessionLock(dsn)
        self.led = asyncio.Event()
        self.leadership = Leadership(
            self.lock, store, coordinator_id=name, url=f"https://{name}:7420", work=self._work
        )

    async def _work(self) -> None:
        self.led.set()
        await asyncio.Event().wait()


async def _backend_pid(lock: SessionLock) -> int:
    conn = lock._conn
    assert conn is not None
    return int(conn.get_server_pid())


async def test_one_leads_and_another_takes_over_when_its_session_ends(pg_url: str) -> None:
    store = SqlStore(pg_url)
    await store.open()
    a, b = Candidate(pg_url, store, "a"), Candidate(pg_url, store, "b")
    runs = [asyncio.create_task(a.leadership.run())]
    try:
        await asyncio.wait_for(a.led.wait(), 10)
        runs.append(asyncio.create_task(b.leadership.run()))
        await asyncio.sleep(2.5)  # b tried at least twice meanwhile
        assert a.leadership.is_leader
        assert not b.leadership.is_leader
        assert not b.led.is_set()
        leader = await current_leader(store)
        assert leader is not None
        assert leader.id == "a"

        # a's session ends (as when its process is killed): b leads within seconds
        victim = await _backend_pid(a.lock)
        admin = SqlStore(pg_url)
        await admin.open()
        try:
            await admin.write_transaction(
                lambda conn: conn.exec_driver_sql(f"SELECT pg_terminate_backend({victim})")
            )
        finally:
            await admin.close()
        ended = time.monotonic()
        await asyncio.wait_for(b.led.wait(), 10)
        print(f"\ntakeover after the leader's session ended: {time.monotonic() - ended:.2f}s")
        assert b.leadership.is_leader
        for _ in range(40):  # a noticed within its next check, and follows
            if not a.leadership.is_leader:
                break
            await asyncio.sleep(0.1)
        assert not a.leadership.is_leader
        leader = await current_leader(store)
        assert leader is not None
        assert leader.id == "b"
        actions = [e.action for e in await store.events(limit=100)]
        assert actions.count("leader_elected") == 2
        assert "leader_lost" in actions
    finally:
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await store.close()


async def test_on_sqlite_the_one_coordinator_always_leads() -> None:
    lock = SoleLock()
    assert await lock.acquire_nowait()
    assert await lock.check()
