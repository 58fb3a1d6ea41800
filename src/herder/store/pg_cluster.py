"""The PostgreSQL side of :mod:`herder.store.cluster`: the leader's session lock and the
``LISTEN``/``NOTIFY`` channel, each on a connection of its own (see there for why)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # ships no stubs

from herder.errors import StoreError
from herder.store.cluster import CHANNEL, CHECK_TIMEOUT_S, CONNECT_TIMEOUT_S, LEADER_LOCK_KEY

log = logging.getLogger("herder.store")

# What a dedicated connection raises when the server goes away. InternalClientError
# too: a connection that lost the server in the middle of an operation can be left
# in that operation's state, and its next one fails with "cannot switch to state
# 13; another operation (2) is in progress" (a CI run's coordinator stopped on it).
CONNECTION_LOST = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class SessionLock:
    """``pg_try_advisory_lock`` on a dedicated connection that dies with its holder."""

    def __init__(self, dsn: str, key: int = LEADER_LOCK_KEY) -> None:
        self._dsn = dsn
        self._key = key
        self._conn: asyncpg.Connection | None = None

    async def acquire_nowait(self) -> bool:
        if self._conn is not None:
            return await self.check()
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
        except CONNECTION_LOST as exc:
            raise StoreError(f"leader lock: cannot connect: {exc}") from exc
        try:
            got = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key))
        except CONNECTION_LOST as exc:
            await conn.close(timeout=CHECK_TIMEOUT_S)
            raise StoreError(f"leader lock: {exc}") from exc
        if not got:
            await conn.close(timeout=CHECK_TIMEOUT_S)
            return False
        self._conn = conn
        return True

    async def check(self) -> bool:
        conn = self._conn
        if conn is None or conn.is_closed():
            self._conn = None
            return False
        try:
            await conn.fetchval("SELECT 1", timeout=CHECK_TIMEOUT_S)
        except CONNECTION_LOST as exc:
            log.warning("leader lock session lost: %s", exc)
            conn.terminate()
            self._conn = None
            return False
        return True

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=CHECK_TIMEOUT_S)
            except CONNECTION_LOST:
                conn.terminate()  # closing the session is what frees the lock


class Channel:
    """``LISTEN``/``NOTIFY`` on :data:`CHANNEL` over one dedicated connection."""

    def __init__(self, dsn: str, on_message: Callable[[str], None]) -> None:
        self._dsn = dsn
        self._on_message = on_message
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Listen, unless listening already.

        One caller at a time: the publish loop and the refresh loop both
        reopen a lost channel, and two at once would each connect, and one
        would publish on the connection whose LISTEN the other was still
        setting up (asyncpg: "another operation is in progress").
        """
        async with self._lock:
            await self._open()

    async def _open(self) -> None:
        if self.is_open:
            return
        try:
            conn = await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S)
        except CONNECTION_LOST as exc:
            raise StoreError(f"peer channel: cannot listen: {exc}") from exc
        try:
            await conn.add_listener(CHANNEL, self._received)
        except CONNECTION_LOST as exc:
            conn.terminate()
            raise StoreError(f"peer channel: cannot listen: {exc}") from exc
        self._conn = conn

    @property
    def is_open(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_message(payload)

    async def publish(self, payloads: list[str]) -> None:
        """Send each payload (each under :data:`MAX_PAYLOAD` bytes) in one round trip."""
        if not payloads:
            return
        async with self._lock:
            await self._open()
            conn = self._conn
            assert conn is not None
            try:
                await conn.executemany("SELECT pg_notify($1, $2)", [(CHANNEL, p) for p in payloads])
            except CONNECTION_LOST as exc:
                conn.terminate()
                self._conn = None
                raise StoreError(f"peer channel: notify failed: {exc}") from exc

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=CHECK_TIMEOUT_S)
            except CONNECTION_LOST:
                conn.terminate()
