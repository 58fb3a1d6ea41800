"""Keeping the fleet at the size the policy asks for.

Two policies for the nodes of one provider (the ``--local N`` herd):

- **fixed**: keep ``desired`` nodes; one that dies is replaced at once.
- **on demand** (agents started with ``--idle-exit``): ``desired`` is a
  ceiling. Nodes leave by themselves when they run out of work and are not
  replaced; when ready tasks wait again, nodes are started for them, up to
  the ceiling and no more than the waiting tasks can use.

The decision (:func:`spawn_count`) is a pure function of what the provider
and the coordinator see; :class:`LocalFleet` carries it out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection

from herder.errors import ProviderError
from herder.providers.base import NodeHandle, Provider

log = logging.getLogger("herder.fleet")


def spawn_count(
    *,
    desired: int,
    slots: int,
    on_demand: bool,
    first_pass: bool,
    own: Collection[str],
    paired: Collection[str],
    leaving: Collection[str],
    ready: int,
) -> int:
    """How many nodes to start now.

    ``own``: nodes the provider has running; ``paired``: those connected to
    the coordinator; ``leaving``: those that said goodbye and are on their
    way out; ``ready``: ready tasks these nodes could run (only read on
    demand). The first pass of an on-demand fleet starts the ceiling, so the
    first work does not wait for nodes to boot.
    """
    if not on_demand or first_pass:
        return max(0, desired - len(own))
    staying = [n for n in own if n not in leaving]
    booting = sum(1 for n in staying if n not in paired)
    room = desired - len(staying)
    # Paired nodes take ready tasks as fast as their slots free up; what is
    # still ready is work they have no room for, less what booting nodes will take.
    need = math.ceil(max(0, ready - booting * slots) / max(1, slots))
    return max(0, min(room, need))


class SpawnBackoff:
    """Spacing between spawns while new nodes keep dying before they pair.

    A node that crashes at start (a broken install, a bad option) would be
    replaced every pass, forever; instead each failure in a row doubles the
    wait before the next spawn (``first_s`` up to ``cap_s``), and a node that
    pairs resets it.
    """

    def __init__(self, first_s: float = 1.0, cap_s: float = 60.0) -> None:
        self.first_s = first_s
        self.cap_s = cap_s
        self.failures = 0
        self.not_before = 0.0

    def failed(self, now: float) -> float:
        """Record a failure; returns the delay before the next spawn."""
        delay = min(self.cap_s, self.first_s * 2.0**self.failures)
        self.failures += 1
        self.not_before = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0

    def allows(self, now: float) -> bool:
        return now >= self.not_before


class LocalFleet:
    """Keeps the nodes of ``provider`` at the count its policy asks for."""

    def __init__(
        self,
        provider: Provider,
        desired: int,
        *,
        slots: int = 1,
        on_demand: bool = False,
        backoff: SpawnBackoff | None = None,
    ) -> None:
        self.provider = provider
        self.desired = desired
        self.slots = slots
        self.on_demand = on_demand
        self.backoff = backoff or SpawnBackoff()
        self._first_pass = True
        self._unpaired: set[str] = set()  # spawned, not yet seen connected

    async def reap(self) -> list[str]:
        """The nodes that exited since the last call; those that never paired count
        as failed spawns (see :class:`SpawnBackoff`)."""
        exited = await self.provider.reap()
        for node_id in exited:
            if node_id in self._unpaired:
                self._unpaired.discard(node_id)
                delay = self.backoff.failed(time.monotonic())
                log.warning(
                    "node %s exited before it paired (%d in a row): next spawn in %.0fs",
                    node_id,
                    self.backoff.failures,
                    delay,
                )
        return exited

    async def reconcile(
        self,
        *,
        paired: Collection[str] = (),
        leaving: Collection[str] = (),
        ready_work: Callable[[int], Awaitable[int]] | None = None,
    ) -> list[NodeHandle]:
        """One pass: start the nodes the policy asks for; returns them.

        ``ready_work(limit)`` counts ready tasks these nodes could run, up to
        ``limit``; it is asked only on demand, and only when there is room.
        """
        if self._unpaired & set(paired):
            self._unpaired -= set(paired)
            self.backoff.succeeded()
        if not self.backoff.allows(time.monotonic()):
            return []
        own = [h.node_id for h in await self.provider.list_own()]
        ready = 0
        if self.on_demand and not self._first_pass and ready_work is not None:
            staying = [n for n in own if n not in leaving]
            room = self.desired - len(staying)
            if room > 0:
                booting = sum(1 for n in staying if n not in paired)
                ready = await ready_work((room + booting) * self.slots)
        count = spawn_count(
            desired=self.desired,
            slots=self.slots,
            on_demand=self.on_demand,
            first_pass=self._first_pass,
            own=own,
            paired=paired,
            leaving=leaving,
            ready=ready,
        )
        self._first_pass = False
        if count <= 0:
            return []
        try:
            handles = await self.provider.spawn(count)
        except (OSError, ProviderError) as exc:
            delay = self.backoff.failed(time.monotonic())
            raise ProviderError(
                f"{self.provider.name}: spawning {count} node(s) failed: {exc}; "
                f"next try in {delay:.0f}s",
                provider=self.provider.name,
            ) from exc
        self._unpaired.update(h.node_id for h in handles)
        log.info(
            "spawned %s%s",
            ", ".join(h.node_id for h in handles),
            " (tasks are waiting)" if self.on_demand and ready else "",
        )
        return handles

    async def stop_all(self, grace: float) -> None:
        self.desired = 0
        handles = await self.provider.list_own()
        await asyncio.gather(*(self.provider.terminate(h.node_id, grace) for h in handles))
