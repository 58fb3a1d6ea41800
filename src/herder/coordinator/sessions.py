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
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def capacity(self) -> int:
        return self.slots + self.prefetch

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
    watched: set[str] = field(default_factory=set)
    closed: bool = False
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, *messages: protocol._Msg) -> None:
        if self.closed:
            return
        async with self._send_lock:
            await self.ws.send_bytes(protocol.encode(*messages))
