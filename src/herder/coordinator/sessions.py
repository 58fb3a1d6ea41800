"""Live connections held by the coordinator: one per paired agent, one per client.

These hold caches only (what is leased to whom, who watches which task);
the store remains the truth and every cache can be rebuilt from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import WebSocket

from herder import protocol
from herder.model import NodeRecord, Reason
from herder.selector import Facts, parse_key

from .auth import CLUSTER_ADMIN, Principal

log = logging.getLogger("herder.coordinator")


@dataclass(eq=False)
class AgentSession:
    """A paired agent: its capacity, its outstanding leases and when it was last heard."""

    node_id: str
    name: str
    slots: int
    prefetch: int
    labels: dict[str, str]
    ws: WebSocket
    outstanding: dict[str, str] = field(default_factory=dict)  # lease_id -> task_id
    last_heard: float = field(default_factory=time.monotonic)
    draining: bool = False
    closed: bool = False
    provider: str = "joined"
    bye: str | None = None  # the reason it gave when it said goodbye
    ready: bool = False  # paired and through the herd's init_node: takes work
    idle_since: float | None = None  # monotonic time it last held no lease
    drain_reason: str | None = None  # why the fleet asked it to leave
    record: NodeRecord | None = None  # as stored when it became ready (for callbacks)
    services: set[str] = field(default_factory=set)  # lease ids of services it was given
    facts: Facts = field(default_factory=Facts)  # what its selectors are evaluated on
    token_id: str | None = None  # the agent token it paired with (None: the cluster secret)
    # lease id -> the resources that lease holds (only leases that need some)
    holding: dict[str, dict[str, float]] = field(default_factory=dict)
    # placement key -> whether this node could ever run it (its facts do not change)
    admits: dict[str, bool] = field(default_factory=dict)
    # releases in its cache (most recently used first) and being installed, as it reported
    releases: list[str] = field(default_factory=list)
    loading: list[str] = field(default_factory=list)
    # release id -> futures of those waiting for it to load there (a ReleaseLoaded error or None)
    release_waiters: dict[str, list[asyncio.Future[str | None]]] = field(default_factory=dict)
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def settle(self) -> None:
        """Note when the node became idle (call after ``outstanding`` changes)."""
        if self.outstanding:
            self.idle_since = None
        elif self.idle_since is None:
            self.idle_since = time.monotonic()

    def leave_reason(self) -> str:
        """The death reason of a node that said goodbye."""
        if self.bye == "idle":
            return Reason.IDLE
        if self.bye == Reason.SPOT_INTERRUPTION:
            return Reason.SPOT_INTERRUPTION
        return self.drain_reason or Reason.DRAINED

    @property
    def capacity(self) -> int:
        """How many leases it may hold: its slots and its prefetch queue.

        None more once services hold every slot: a service never ends, so
        whatever queued behind them would never start.
        """
        if self._services_held() >= self.slots:
            return len(self.outstanding)
        return self.slots + self.prefetch

    def finishing(self) -> int:
        """Leases it holds that will end by themselves: all but its services'."""
        return len(self.outstanding) - self._services_held()

    def admit(self, key: str) -> bool:
        """Whether this node could ever run tasks of placement ``key`` (cached)."""
        ok = self.admits.get(key)
        if ok is None:
            ok = self.admits[key] = key == "" or parse_key(key).admits(self.facts)
        return ok

    def free_resources(self) -> dict[str, float]:
        """Its resources minus what its outstanding leases hold."""
        for lid in [lid for lid in self.holding if lid not in self.outstanding]:
            del self.holding[lid]  # acknowledged, cancelled or handed back
        free = dict(self.facts.resources)
        for held in self.holding.values():
            for name, amount in held.items():
                free[name] = free.get(name, 0) - amount
        return free

    def _services_held(self) -> int:
        self.services &= self.outstanding.keys()  # forget those acknowledged or handed back
        return len(self.services)

    @property
    def free(self) -> int:
        if self.draining or self.closed:
            return 0
        return self.capacity - len(self.outstanding)

    async def send(self, *messages: protocol._Msg) -> None:
        if self.closed:
            return
        async with self._send_lock:
            await self.ws.send_bytes(protocol.encode(*messages))


@dataclass(eq=False)
class ClientSession:
    """A client's session channel: submissions in, outcomes of watched tasks out."""

    ws: WebSocket
    principal: Principal = CLUSTER_ADMIN  # who opened it: its token's revocation closes it
    closed: bool = False
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, *messages: protocol._Msg) -> None:
        if self.closed:
            return
        async with self._send_lock:
            await self.ws.send_bytes(protocol.encode(*messages))
