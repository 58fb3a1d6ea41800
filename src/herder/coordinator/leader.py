"""Which coordinator of a store leads: runs the fleet reconcile loop and the silent-node sweep.

Several coordinators may share one PostgreSQL store. Exactly one of them
provisions, replaces and cleans up nodes, and declares lost the nodes that
no coordinator has heard for a while (the agents of a coordinator that
died). Leadership is a PostgreSQL advisory lock held by a connection of the
leader's own (:class:`herder.store.pg_cluster.SessionLock`): when the leader
dies, PostgreSQL ends its session and frees the lock, and the next
coordinator to try (each tries every :data:`RETRY_S`) leads. A leader that
loses its session (the database restarted, the network was cut) stops its
leader work at once and tries again like the others.

On SQLite there is one coordinator per store, and it always leads.

Gaining and losing leadership are logged and recorded as events
(``leader_elected`` / ``leader_lost``); the store's meta key ``leader``
names the current leader for ``/v1/status``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from herder.errors import StoreError
from herder.store.cluster import LeaderLock
from herder.store.sql import SqlStore

log = logging.getLogger("herder.coordinator")

RETRY_S = 1.0  # how often a follower tries the lock, and a leader checks it
LEADER_KEY = "leader"


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads, as recorded in the store by the leader itself."""

    id: str
    url: str
    since: float


class Leadership:
    """Hold the leader lock when it is free, and run ``work`` while it is held."""

    def __init__(
        self,
        lock: LeaderLock,
        store: SqlStore,
        *,
        coordinator_id: str,
        url: str,
        work: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self._lock = lock
        self._store = store
        self.coordinator_id = coordinator_id
        self._url = url
        self._work = work
        self.since: float | None = None  # monotonic time it gained leadership

    @property
    def is_leader(self) -> bool:
        return self.since is not None

    async def run(self) -> None:
        """Until cancelled: follow, lead when the lock is free, follow again if it is lost."""
        try:
            while True:
                if await self._try_lock():
                    await self._lead()
                await asyncio.sleep(RETRY_S)
        finally:
            await self._lock.release()

    async def _try_lock(self) -> bool:
        try:
            return await self._lock.acquire_nowait()
        except StoreError as exc:  # the database is away: a follower until it is back
            log.warning("leader lock not tried: %s", exc)
            return False

    async def _lead(self) -> None:
        self.since = time.monotonic()
        now = time.time()
        log.info(
            "coordinator %s leads: it runs the fleet reconcile loop",
            self.coordinator_id,
            extra={"action": "leader_elected"},
        )
        await self._record_elected(now)
        work = asyncio.create_task(self._work(), name="leader-work")
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=RETRY_S)
                if not work.done() and not await self._lock.check():
                    break
        finally:
            self.since = None
            work.cancel()
            await asyncio.wait({work})
        if not work.cancelled() and (exc := work.exception()) is not None:
            raise exc  # the leader's loops died: the coordinator stops loudly
        log.warning(
            "coordinator %s lost leadership (its lock session ended)",
            self.coordinator_id,
            extra={"action": "leader_lost"},
        )
        await self._lock.release()
        try:
            await self._store.add_event(
                "leader_lost", time.time(), data={"coordinator": self.coordinator_id}
            )
        except StoreError as exc:  # the store may be what went away
            log.error("leadership loss not recorded: %s", exc)

    async def _record_elected(self, now: float) -> None:
        info = {"id": self.coordinator_id, "url": self._url, "since": now}
        try:
            await self._store.set_meta(LEADER_KEY, json.dumps(info))
            data = {"coordinator": self.coordinator_id, "url": self._url}
            await self._store.add_event("leader_elected", now, data=data)
        except StoreError as exc:
            log.error("leadership not recorded: %s", exc)


async def current_leader(store: SqlStore) -> LeaderInfo | None:
    """The leader the store names (it may have died less than a retry ago)."""
    raw = await store.get_meta(LEADER_KEY)
    if raw is None:
        return None
    data = json.loads(raw)
    return LeaderInfo(id=str(data["id"]), url=str(data["url"]), since=float(data["since"]))
