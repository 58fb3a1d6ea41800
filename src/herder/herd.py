"""The herd: the user's fleet policy as a class, ``herder up --herd pkg.module:MyHerd``.

Class attributes say what to keep (a provider, a count or bounds, timeouts);
``async`` methods are called as the fleet changes. The four *steps*
(:meth:`Herd.acquire`, :meth:`Herd.init_node`, :meth:`Herd.should_remove`,
:meth:`Herd.maintain`) are the built-in behaviour, and overriding one changes
only that step::

    class MyHerd(herder.Herd):
        provider = herder.providers.EC2(region="us-west-1", spot_price=0.15)
        min_nodes, max_nodes = 0, 10

        async def on_node_down(self, node, reason):
            print(node.id, "went down:", reason)

Callbacks run one at a time, in the order things happened, on the
coordinator's event loop (so a slow one delays the next, never the
dispatch of tasks). One that raises is logged with its traceback and
recorded as a ``herd_callback_failed`` event; the herd goes on.

Policy: with ``target`` set, the fleet keeps exactly that many nodes (a
service fleet); with ``target = None`` it autoscales between ``min_nodes``
and ``max_nodes``: it grows when ready tasks have exceeded the free slots
for ``scale_up_after_s``, and drains nodes idle for ``idle_s``.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any, ClassVar

from herder.errors import ConfigError
from herder.model import EventRecord, NodeRecord
from herder.providers.base import Provider

if TYPE_CHECKING:
    from herder.fleet import Fleet
    from herder.providers.forks import ForkServer


class Herd:
    """Subclass this; every attribute and method has a working default."""

    provider: ClassVar[Provider | None] = None
    min_nodes: int = 0
    max_nodes: int = 10
    target: int | None = None  # a fixed count; None: autoscale between min and max
    slots: int = 1  # slots of each node the provider starts
    labels: ClassVar[dict[str, str]] = {}  # labels of each node the provider starts
    # a release (``herder release create``) every node loads before it takes work,
    # and that tasks naming none run in; None: ``[fleet] release``, or none
    release: str | None = None
    boot_timeout_s: float = 300.0  # a node not paired by then is terminated and replaced
    reconcile_s: float = 1.0
    scale_up_after_s: float = 2.0
    idle_s: float = 60.0
    orphan_after_s: float = 15 * 60.0  # agents leave (or shut their machine down) alone
    inventory_s: float = 10.0  # how often the provider's inventory is compared with the store

    def __init__(self) -> None:
        self._fleet: Fleet | None = None
        self._provider = type(self).provider

    @property
    def fleet(self) -> Fleet:
        """The supervisor running this herd (set when the coordinator starts)."""
        if self._fleet is None:
            raise RuntimeError("this herd is not running yet")
        return self._fleet

    def bind(self, fleet: Fleet) -> None:
        self._fleet = fleet

    def get_provider(self) -> Provider | None:
        return self._provider

    # --- callbacks ------------------------------------------------------------------

    async def on_node_up(self, node: NodeRecord) -> None:
        """A node is ready for work (paired, and :meth:`init_node` done)."""

    async def on_node_down(self, node: NodeRecord, reason: str) -> None:
        """A node stopped serving: lost (``reason`` says why) or terminated."""

    async def on_telemetry(self, node: NodeRecord, data: dict[str, Any]) -> None:
        """A node's heartbeat telemetry (cpu %, memory, disk, load)."""

    async def on_terminated(self, node: NodeRecord) -> None:
        """The provider destroyed the node's machine (it no longer costs anything)."""

    async def on_event(self, event: EventRecord) -> None:
        """Every event the store records (node moves, provider errors, tasks)."""

    # --- steps (the defaults are the built-in behaviour) -----------------------------

    async def acquire(self, n: int) -> None:
        """Obtain ``n`` more nodes: by default, ask the provider."""
        await self.fleet.spawn(n)

    async def init_node(self, node: NodeRecord) -> None:
        """Prepare a paired node before it takes work; raise to reject it (it is
        terminated and replaced)."""

    async def should_remove(self, node: NodeRecord) -> bool:
        """Whether to drain this ready node now: autoscaling drains nodes idle
        for ``idle_s`` (the fleet never goes below ``min_nodes``)."""
        return self.fleet.target is None and self.fleet.idle_seconds(node.id) >= self.idle_s

    async def maintain(self) -> None:
        """One reconcile pass, every ``reconcile_s``."""
        await self.fleet.reconcile()


def overrides(herd: Herd, method: str) -> bool:
    """Whether ``herd``'s class replaces ``Herd.<method>`` (skip work nobody listens to)."""
    return getattr(type(herd), method) is not getattr(Herd, method)


def load_herd(spec: str) -> Herd:
    """The herd named ``pkg.module:ClassName``, imported (from the current
    directory too, as ``python -m`` would) and instantiated."""
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"--herd {spec!r}: expected pkg.module:ClassName", field="herd")
    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--herd {spec!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Herd)):
        raise ConfigError(
            f"--herd {spec!r}: {class_name} is not a herder.Herd subclass in {module_name}",
            field="herd",
        )
    herd = cls()
    if herd.max_nodes < herd.min_nodes or herd.min_nodes < 0:
        raise ConfigError(
            f"--herd {spec!r}: min_nodes {herd.min_nodes} and max_nodes {herd.max_nodes} "
            "must satisfy 0 <= min_nodes <= max_nodes",
            field="max_nodes",
        )
    return herd


def local_herd(
    nodes: int,
    *,
    slots: int = 1,
    idle_s: float | None = None,
    env: dict[str, str] | None = None,
    forks: ForkServer | None = None,
) -> Herd:
    """``herder up --local N``: N local agents kept running; with ``idle_s``
    (``--idle-exit``) N is a ceiling, idle agents are drained and new ones
    start when tasks wait. ``forks``: the fork server that starts them."""
    from herder.providers.local import LocalProvider

    herd = Herd()
    herd._provider = LocalProvider(env=env, forks=forks) if nodes else None
    herd.max_nodes = nodes
    herd.slots = slots
    herd.boot_timeout_s = 60.0
    if idle_s is None:
        herd.target = nodes
    else:
        herd.idle_s = idle_s
        herd.scale_up_after_s = 0.0
    return herd
