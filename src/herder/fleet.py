"""Keeping the fleet at the size the policy asks for.

For now one policy: a fixed number of nodes from one provider, replaced at
once when one dies (the ``--local N`` herd).
"""

from __future__ import annotations

import asyncio
import logging

from herder.providers.base import Provider

log = logging.getLogger("herder.fleet")


class LocalFleet:
    """Keeps ``desired`` nodes of ``provider`` alive."""

    def __init__(self, provider: Provider, desired: int) -> None:
        self.provider = provider
        self.desired = desired

    async def reconcile(self) -> list[str]:
        """One pass: reap the dead, spawn up to the desired count; returns the dead."""
        dead = await self.provider.reap()
        for node_id in dead:
            log.warning("node %s exited: replacing it", node_id)
        missing = self.desired - len(await self.provider.list_own())
        if missing > 0:
            handles = await self.provider.spawn(missing)
            log.info("spawned %s", ", ".join(h.node_id for h in handles))
        return dead

    async def stop_all(self, grace: float) -> None:
        self.desired = 0
        handles = await self.provider.list_own()
        await asyncio.gather(*(self.provider.terminate(h.node_id, grace) for h in handles))
