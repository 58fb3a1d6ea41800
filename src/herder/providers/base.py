"""The provider interface: spawn, terminate, list what it owns.

A provider knows machines (or processes), not tasks. Counts and roles are
passed as data; the fleet decides how many, the provider only obeys.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeHandle:
    """What a provider knows of one node it created."""

    node_id: str
    provider: str
    address: str | None = None


class Provider(abc.ABC):
    name: str

    @abc.abstractmethod
    async def spawn(self, count: int) -> list[NodeHandle]:
        """Start ``count`` nodes whose agents will join by themselves."""

    @abc.abstractmethod
    async def terminate(self, node_id: str, grace: float) -> None:
        """Stop a node: politely first, by force after ``grace`` seconds."""

    @abc.abstractmethod
    async def list_own(self) -> list[NodeHandle]:
        """The nodes this provider created that still exist."""

    @abc.abstractmethod
    async def reap(self) -> list[str]:
        """Ids of nodes that died since the last call (for prompt replacement)."""
