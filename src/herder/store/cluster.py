"""What several coordinators on one PostgreSQL share besides tables: a lock and a channel.

The two live in :mod:`herder.store.pg_cluster`, loaded only for a PostgreSQL
store (asyncpg costs a coordinator on SQLite 16 MB and its start 0.1 s):

- :class:`~herder.store.pg_cluster.SessionLock`: ``pg_try_advisory_lock`` held by a
  connection of its own. PostgreSQL frees a session's advisory locks when the session ends, so
  the holder's death (kill -9, a lost machine, a cut network) frees the lock
  with no lease to expire: the database is the arbiter, there is no
  consensus of our own.
- :class:`~herder.store.pg_cluster.Channel`: ``LISTEN``/``NOTIFY`` on a connection of its own, so a
  coordinator learns at once what the others committed (tasks made ready,
  tasks finished, bus messages). Notifications are hints: whatever one says
  is in the tables, and a coordinator that missed one still finds it there.

On SQLite there is one coordinator per store: it always holds the lock and
has no one to tell (:class:`SoleLock`, ``Channel`` is not used).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from herder.store.pg_cluster import Channel

# The reconcile leader's advisory lock key (any bigint; this one spells "herd").
LEADER_LOCK_KEY = 0x68657264
CHANNEL = "herder_peers"
# NOTIFY payloads must stay under 8000 bytes.
MAX_PAYLOAD = 7900
CONNECT_TIMEOUT_S = 5.0
CHECK_TIMEOUT_S = 5.0


def pg_dsn(store_url: str) -> str | None:
    """The asyncpg DSN of a PostgreSQL store URL; None for SQLite."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if store_url.startswith(prefix):
            return "postgresql://" + store_url.removeprefix(prefix)
    return None


class LeaderLock(Protocol):
    """A lock at most one coordinator of a store holds, freed when its holder dies."""

    async def acquire_nowait(self) -> bool:
        """Take the lock if it is free; True if this process holds it (now or already)."""
        ...

    async def check(self) -> bool:
        """Whether the lock is still held (False once its session is gone)."""
        ...

    async def release(self) -> None:
        """Let go (idempotent): the next ``acquire_nowait`` anywhere may win."""
        ...


class SoleLock:
    """SQLite: one coordinator per store, always the leader."""

    async def acquire_nowait(self) -> bool:
        return True

    async def check(self) -> bool:
        return True

    async def release(self) -> None:
        return None


def leader_lock(store_url: str) -> LeaderLock:
    """The leader lock for a store: a PostgreSQL session lock, or SQLite's sole one."""
    dsn = pg_dsn(store_url)
    if dsn is None:
        return SoleLock()
    from herder.store.pg_cluster import SessionLock

    return SessionLock(dsn)


def peer_channel(store_url: str, on_message: Callable[[str], None]) -> Channel | None:
    """The channel to the other coordinators of a PostgreSQL store; None on SQLite."""
    dsn = pg_dsn(store_url)
    if dsn is None:
        return None
    from herder.store.pg_cluster import Channel

    return Channel(dsn, on_message)
