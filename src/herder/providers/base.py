"""The provider interface: spawn, terminate, list what it owns.

A provider knows machines (or processes), not tasks. Counts and roles are
passed as data; the fleet decides how many and which node ids, the provider
only obeys.

The fleet writes a ``requested`` record for every node *before* it asks the
provider for it, and every node a provider creates carries the id the fleet
chose (a tag on a cloud instance, a pid file on an SSH host, an argument of
a local agent). So a machine the store does not know, found by
:meth:`Provider.list_own`, is an orphan (a coordinator died between the two
steps, or a terminate failed) and is destroyed.
"""

from __future__ import annotations

import abc
import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class LaunchSpec:
    """What every new node needs to start an agent that joins this herd.

    ``join`` (TOKEN@URL) carries the secret: providers pass it to the agent
    through its environment, a file of mode 0600 or user data, never argv.
    """

    join: str
    cluster: str
    slots: int = 1
    labels: dict[str, str] = field(default_factory=dict)
    orphan_after_s: float = 15 * 60.0


@dataclass(frozen=True)
class NodeHandle:
    """What a provider knows of one node it created."""

    node_id: str
    provider: str
    address: str | None = None  # a pid, a host name, an instance id


@dataclass
class SpawnResult:
    """The nodes that started, and why the others did not (quota, capacity,
    credentials, an unreachable host), by node id."""

    started: list[NodeHandle] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class Provider(abc.ABC):
    """Creates and destroys nodes; one instance per coordinator.

    :meth:`attach` is called once before any other method: user code builds a
    provider (``herder.providers.EC2(...)`` in a Herd class) before the
    coordinator knows its cluster id and home directory.
    """

    name: str
    cluster: str = ""
    home: Path | None = None

    def attach(self, *, cluster: str, home: Path) -> None:
        """Bind to a coordinator: the cluster id nodes are tagged with, and a
        directory for the provider's own files (registries, logs, caches)."""
        self.cluster = cluster
        self.home = home

    def new_node_id(self) -> str:
        return f"{self.name}-{secrets.token_hex(4)}"

    def capacity(self) -> int | None:
        """The most nodes this provider can hold at once (None: no limit of its own)."""
        return None

    @abc.abstractmethod
    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        """Start one node per id, each running an agent that joins with that id.

        Returns at once the machine is asked for (not when its agent pairs).
        A failure of one node is reported in :attr:`SpawnResult.failed`; an
        exception means none started.
        """

    @abc.abstractmethod
    async def terminate(self, node_id: str, grace: float) -> None:
        """Destroy a node: politely first, by force after ``grace`` seconds.

        Idempotent: a node that is already gone is not an error.
        """

    @abc.abstractmethod
    async def list_own(self) -> list[NodeHandle]:
        """The nodes of this cluster that this provider's kind of machine still
        holds, including those created by an earlier coordinator."""

    async def reap(self) -> list[str]:
        """Ids of nodes known to have died since the last call (for prompt
        replacement); providers that cannot tell return nothing and the
        heartbeat timeout finds the dead instead."""
        return []

    async def close(self) -> None:
        """Release connections and clients (the nodes keep running)."""
        return None
