"""The node supervisor: keeps the fleet at the size the herd's policy asks for.

Every ``reconcile_s`` the herd's :meth:`~herder.herd.Herd.maintain` step runs
one pass (:meth:`Fleet.reconcile` by default):

1. nodes the provider saw die are declared gone (their leases requeued);
2. ready/busy is brought up to date from the live sessions (sampled once
   a pass, so a node that flips between tasks costs no store write per task);
3. requested or booting nodes past their ``boot_timeout`` are terminated;
4. every ``inventory_s``, what the provider holds is compared with the
   store: a machine whose node the store does not know as alive (an orphan
   of a crash, a node that failed to boot, a terminate that failed) is
   destroyed;
5. the desired count (a fixed ``target``, or autoscaling between
   ``min_nodes`` and ``max_nodes``) is compared with the nodes that are
   staying; the herd's ``acquire`` step starts what is missing (never more
   than ``max_nodes`` alive, +1 while a replacement boots) and surplus nodes
   are drained, idle ones first;
6. the herd's ``should_remove`` step is asked about each ready node (by
   default: drain nodes idle for ``idle_s`` while above ``min_nodes``).

A node is recorded as ``requested`` *before* its provider is called, so a
provider failure, a timeout or a coordinator crash in between leaves a
record with a reason, never an untracked machine. Provider failures back off
exponentially (:class:`SpawnBackoff`) and become ``provider_error`` events.

The coordinator supplies what only it knows through :class:`AgentLink`
(fleet.py may not import the coordinator).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from herder.errors import HerderError, InvalidTransition, ProviderError
from herder.herd import Herd, overrides
from herder.model import NodeRecord, NodeState, Reason
from herder.providers.base import LaunchSpec, Provider
from herder.store.base import Store

log = logging.getLogger("herder.fleet")

_STAYING = (NodeState.REQUESTED, NodeState.BOOTING, NodeState.CONNECTED, NodeState.READY)
_UNPAIRED = (NodeState.REQUESTED, NodeState.BOOTING)
TARGET_KEY = "fleet.target"


@dataclass(frozen=True)
class NodeLoad:
    """What the coordinator knows of a paired node right now."""

    slots: int
    running: int  # leases it holds
    idle_since: float | None  # monotonic time it last became empty; None while busy
    ready: bool  # init_node done, takes work
    draining: bool


class AgentLink(Protocol):
    """The coordinator's side of the fleet: sessions, the queue, leases."""

    def loads(self) -> dict[str, NodeLoad]:
        """Paired nodes and their load."""
        ...

    async def ready_tasks(self, labels: dict[str, str], limit: int) -> int:
        """Ready tasks a node with ``labels`` could run, counted up to ``limit``."""
        ...

    async def drain(self, node_id: str, reason: str, *, kill: bool) -> bool:
        """Ask a paired node to take nothing more and leave once its running tasks
        are done (``kill``: stop them and hand them back now); False if not paired."""
        ...

    async def node_gone(self, node_id: str, reason: str) -> None:
        """A node died without saying goodbye: record it lost, requeue its leases."""
        ...


class SpawnBackoff:
    """Spacing between spawns while the provider fails or new nodes die before pairing.

    Each failure in a row doubles the wait before the next spawn (``first_s``
    up to ``cap_s``); a node that pairs resets it.
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


def nodes_to_add(
    *,
    desired: int,
    staying: int,
    alive: int,
    max_nodes: int,
    capacity: int | None,
) -> int:
    """How many nodes to start: up to ``desired`` staying nodes, with never more
    than ``max_nodes`` + 1 alive (the +1 lets a replacement boot while a
    draining node finishes) nor more than the provider can hold."""
    room = max_nodes + 1 - alive
    if capacity is not None:
        room = min(room, capacity - alive)
    return max(0, min(desired - staying, room))


def autoscale_need(*, ready: int, unpaired_slots: int, slots: int) -> int:
    """Nodes wanted for ``ready`` tasks that no paired node has room for, less
    what the nodes still booting will take."""
    return math.ceil(max(0, ready - unpaired_slots) / max(1, slots))


class Fleet:
    """Runs one herd: its provider, its policy, its callbacks."""

    def __init__(
        self,
        herd: Herd,
        store: Store,
        link: AgentLink,
        *,
        join: str,
        spawn_timeout_s: float = 120.0,
        grace_s: float = 10.0,
        backoff: SpawnBackoff | None = None,
    ) -> None:
        self.herd = herd
        self.store = store
        self.link = link
        self.provider: Provider | None = herd.get_provider()
        self._join = join
        self.spawn_timeout_s = spawn_timeout_s
        self.grace_s = grace_s
        self.backoff = backoff or SpawnBackoff()
        self.target: int | None = herd.target
        self.launch: LaunchSpec | None = None
        self._spawning: set[str] = set()
        self._destroying: dict[str, asyncio.Task[None]] = {}
        self._pressure_since: float | None = None
        self._last_inventory = -math.inf
        self._exited: set[str] = set()
        self._down: set[str] = set()  # nodes whose end was reported to the herd
        self._callbacks: asyncio.Queue[tuple[str, tuple[Any, ...]]] = asyncio.Queue()
        self._last_event = 0
        self._on_event = overrides(herd, "on_event")
        self._on_telemetry = overrides(herd, "on_telemetry")
        herd.bind(self)

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, home: Any) -> None:
        """Bind the provider to this herd and read the persisted target."""
        cluster = await self.store.cluster_id()
        if self.provider is not None:
            self.provider.attach(cluster=cluster, home=home)
            self.launch = LaunchSpec(
                join=self._join,
                cluster=cluster,
                slots=self.herd.slots,
                labels=dict(self.herd.labels),
                orphan_after_s=self.herd.orphan_after_s,
            )
        await self._load_target()
        if self._on_event:
            self._last_event = await self.store.latest_event_id()

    async def _load_target(self) -> None:
        """``herder scale`` survives a restart of the same herd; a changed herd wins."""
        raw = await self.store.get_meta(TARGET_KEY)
        if raw is None:
            return
        saved = json.loads(raw)
        if saved.get("configured") == self.herd.target:
            self.target = saved.get("target")

    async def run(self, stopping: asyncio.Event) -> None:
        """The reconcile loop and the callback worker, until ``stopping`` is set."""
        worker = asyncio.create_task(self.run_callbacks(), name="herd-callbacks")
        try:
            await self.run_reconcile(stopping)
        finally:
            worker.cancel()

    async def run_reconcile(self, stopping: asyncio.Event) -> None:
        """The reconcile loop alone, until ``stopping`` is set or it is cancelled.

        Several coordinators on one store: only the leader runs it
        (herder.coordinator.leader); every coordinator runs
        :meth:`run_callbacks` for the nodes it serves.
        """
        self._last_inventory = -math.inf  # a new leader takes inventory first
        if self._on_event:  # on_event from now: the old leader called it for earlier ones
            self._last_event = await self.store.latest_event_id()
        while not stopping.is_set():
            await self._pass()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.herd.reconcile_s)

    async def run_callbacks(self) -> None:
        """Run herd callbacks one at a time, in the order things happened."""
        await self._callback_worker()

    async def _pass(self) -> None:
        try:
            await self.herd.maintain()
            if self._on_event:
                await self._poll_events()
        except ProviderError as exc:
            log.error("%s", exc)
            if not exc.context.get("recorded"):
                await self._record("provider_error", None, {"error": str(exc)})
        except HerderError as exc:  # the store was away, a provider misbehaved
            log.error("fleet pass postponed: %s", exc)
        except Exception as exc:  # user code (a Herd step, a custom provider)
            log.exception("fleet pass failed")
            await self._record(
                "herd_callback_failed", None, {"step": "maintain", "error": repr(exc)}
            )

    async def stop_all(self) -> None:
        """Terminate every node this herd's provider holds (the herd is ending)."""
        self.target = 0
        if self.provider is None:
            return
        handles = await self.provider.list_own()
        await asyncio.gather(
            *(self._destroy(h.node_id, Reason.SHUTDOWN) for h in handles),
            *self._destroying.values(),
            return_exceptions=True,
        )
        await self.provider.close()
        name = self.provider.name
        left = [n.id for n in await self.store.nodes(alive_only=True) if n.provider == name]
        await self.store.set_node_states(
            [(node_id, NodeState.TERMINATED, Reason.SHUTDOWN, None) for node_id in left],
            time.time(),
        )

    # --- the reconcile pass ---------------------------------------------------------

    async def reconcile(self) -> None:
        """The built-in pass (see the module docstring)."""
        await self._reap()
        now = time.time()
        nodes = await self.store.nodes(alive_only=True)
        loads = self.link.loads()
        await self._sync_busy(nodes, loads, now)
        if self.provider is None:
            return
        mine = [n for n in nodes if n.provider == self.provider.name]
        mine = await self._expire_boots(mine, loads, now)
        if time.monotonic() - self._last_inventory >= self.herd.inventory_s:
            await self._inventory(mine)
        staying = [n for n in mine if n.state in _STAYING or n.state is NodeState.BUSY]
        desired = await self._desired(staying, loads)
        add = nodes_to_add(
            desired=desired,
            staying=len(staying),
            alive=len(mine),
            max_nodes=self.herd.max_nodes,
            capacity=self.provider.capacity(),
        )
        if add and self.backoff.allows(time.monotonic()):
            await self.herd.acquire(add)
        elif len(staying) > desired:
            await self._shrink(staying, loads, len(staying) - desired)
        else:
            await self._weed(staying, loads)

    async def _reap(self) -> None:
        """Nodes whose process the provider saw exit; one still connected is decided
        on a later pass, once its last frames (a goodbye?) are in."""
        if self.provider is None:
            return
        self._exited.update(await self.provider.reap())
        loads = self.link.loads()
        for node_id in sorted(self._exited):
            if node_id in loads:
                continue
            self._exited.discard(node_id)
            record = await self._node(node_id)
            if record is None or not record.state.is_alive:
                continue
            if record.state in _UNPAIRED:
                delay = self.backoff.failed(time.monotonic())
                log.warning(
                    "node %s exited before it paired (%d in a row): next spawn in %.0fs",
                    node_id,
                    self.backoff.failures,
                    delay,
                )
            await self.link.node_gone(node_id, Reason.PROCESS_EXITED)

    async def _sync_busy(
        self, nodes: list[NodeRecord], loads: dict[str, NodeLoad], now: float
    ) -> None:
        moves: list[tuple[str, NodeState, str | None, str | None]] = []
        for node in nodes:
            load = loads.get(node.id)
            if (
                load is None
                or not load.ready
                or node.state not in (NodeState.READY, NodeState.BUSY)
            ):
                continue
            state = NodeState.BUSY if load.running else NodeState.READY
            if state != node.state:
                moves.append((node.id, state, None, None))
        if moves:
            await self.store.set_node_states(moves, now)

    async def _expire_boots(
        self, mine: list[NodeRecord], loads: dict[str, NodeLoad], now: float
    ) -> list[NodeRecord]:
        kept = []
        for node in mine:
            late = node.deadline is not None and node.deadline < now
            if node.state in _UNPAIRED and late and node.id not in loads:
                delay = self.backoff.failed(time.monotonic())
                log.warning(
                    "node %s did not pair within %.0fs: terminated (next spawn in %.0fs)",
                    node.id,
                    self.herd.boot_timeout_s,
                    delay,
                )
                await self._end(node, Reason.BOOT_TIMEOUT)
            else:
                kept.append(node)
        return kept

    async def _inventory(self, mine: list[NodeRecord]) -> None:
        """Destroy what the provider holds and the store does not know as alive."""
        assert self.provider is not None
        self._last_inventory = time.monotonic()
        known = {n.id for n in mine} | self._spawning | set(self._destroying)
        for handle in await self.provider.list_own():
            if handle.node_id in known:
                continue
            log.warning(
                "%s node %s (%s) is not tracked by this herd: terminating it",
                self.provider.name,
                handle.node_id,
                handle.address,
            )
            await self._record("orphan_terminated", handle.node_id, {"address": handle.address})
            self._destroy_later(handle.node_id, Reason.ORPHAN)

    async def _desired(self, staying: list[NodeRecord], loads: dict[str, NodeLoad]) -> int:
        herd = self.herd
        if self.target is not None:
            return max(herd.min_nodes, min(herd.max_nodes, self.target))
        assert self.launch is not None
        unpaired = sum(n.slots for n in staying if not _serving(loads.get(n.id)))
        limit = (herd.max_nodes - len(staying)) * herd.slots + unpaired
        ready = await self.link.ready_tasks(self.launch.labels, limit) if limit > 0 else 0
        need = autoscale_need(ready=ready, unpaired_slots=unpaired, slots=herd.slots)
        now = time.monotonic()
        if need <= 0:
            self._pressure_since = None
        elif self._pressure_since is None:
            self._pressure_since = now
        grow = need if need and now - (self._pressure_since or now) >= herd.scale_up_after_s else 0
        return max(herd.min_nodes, min(herd.max_nodes, len(staying) + grow))

    async def _shrink(
        self, staying: list[NodeRecord], loads: dict[str, NodeLoad], surplus: int
    ) -> None:
        """Above the desired count: unpaired nodes go first (they run nothing), then
        the least loaded; draining lets running tasks finish."""

        def cost(node: NodeRecord) -> tuple[int, float]:
            load = loads.get(node.id)
            return (0, 0.0) if load is None else (1 + load.running, -(load.idle_since or 0.0))

        for node in sorted(staying, key=cost)[:surplus]:
            await self.drain(node.id, Reason.SCALED_DOWN)

    async def _weed(self, staying: list[NodeRecord], loads: dict[str, NodeLoad]) -> None:
        left = len(staying)
        for node in staying:
            if left <= self.herd.min_nodes:
                return
            load = loads.get(node.id)
            if load is None or not load.ready or load.running or load.draining:
                continue
            if await self.herd.should_remove(node):
                await self.drain(node.id, Reason.IDLE)
                left -= 1

    # --- actions (the CLI's scale, drain and terminate land here) --------------------

    async def spawn(self, n: int) -> list[str]:
        """Ask the provider for ``n`` nodes; returns the ids that started booting."""
        if self.provider is None or self.launch is None:
            raise ProviderError("this herd has no provider to start nodes with")
        provider, launch = self.provider, self.launch
        now = time.time()
        ids = [provider.new_node_id() for _ in range(n)]
        await self.store.add_nodes(
            [
                NodeRecord(
                    id=node_id,
                    name=node_id,
                    state=NodeState.REQUESTED,
                    provider=provider.name,
                    labels=launch.labels,
                    slots=launch.slots,
                    host=None,
                    pid=None,
                    created_at=now,
                    last_seen=None,
                    reason=None,
                    deadline=now + self.herd.boot_timeout_s,
                )
                for node_id in ids
            ]
        )
        self._spawning.update(ids)
        try:
            result = await asyncio.wait_for(provider.spawn(ids, launch), self.spawn_timeout_s)
        except Exception as exc:  # any failure of the provider, ours or the user's
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            await self._spawn_failed({i: why for i in ids})
            raise ProviderError(
                f"{provider.name}: starting {n} node(s) failed: {why}",
                provider=provider.name,
                recorded=True,
            ) from exc
        finally:
            self._spawning.difference_update(ids)
        await self.store.set_node_states(
            [(h.node_id, NodeState.BOOTING, None, h.address) for h in result.started], time.time()
        )
        if result.started:
            log.info("%s: started %s", provider.name, ", ".join(h.node_id for h in result.started))
        if result.failed:
            await self._spawn_failed(result.failed)
        return [h.node_id for h in result.started]

    async def _spawn_failed(self, failed: dict[str, str]) -> None:
        assert self.provider is not None
        delay = self.backoff.failed(time.monotonic())
        await self.store.set_node_states(
            [
                (i, NodeState.TERMINATED, f"{Reason.PROVIDER_ERROR}: {why}", None)
                for i, why in failed.items()
            ],
            time.time(),
        )
        for node_id, why in failed.items():
            log.error("%s: node %s not started: %s", self.provider.name, node_id, why)
        await self._record(
            "provider_error",
            None,
            {"provider": self.provider.name, "failed": failed, "retry_in_s": delay},
        )
        # A call that failed half-way may still have made a machine: the next
        # inventory, not the usual timer, looks for it.
        self._last_inventory = -math.inf

    async def scale(self, target: int | None) -> None:
        """Set the fixed count (None: the herd's own policy); kept across restarts."""
        if target is not None and not 0 <= target <= self.herd.max_nodes:
            raise HerderError(
                f"scale: {target} is outside 0..max_nodes ({self.herd.max_nodes})",
                target=target,
            )
        await self.store.set_meta(
            TARGET_KEY, json.dumps({"target": target, "configured": self.herd.target})
        )
        self.target = self.herd.target if target is None else target
        await self._record("fleet_scaled", None, {"target": self.target})

    async def drain(self, node_id: str, reason: str = Reason.USER) -> None:
        """Take no more work on the node; it leaves once its running tasks end."""
        node = await self._require(node_id)
        if node.state in _UNPAIRED:  # nothing runs there yet: no reason to wait
            await self._end(node, reason)
            return
        if not node.state.is_alive or node.state is NodeState.DRAINING:
            return
        await self.store.set_node_state(node_id, NodeState.DRAINING, reason, time.time())
        if not await self.link.drain(node_id, reason, kill=False):
            await self._end(node, reason)

    async def terminate(self, node_id: str, reason: str = Reason.USER) -> None:
        """End the node now: its running tasks are stopped and go back to the queue."""
        node = await self._require(node_id)
        await self.link.drain(node_id, reason, kill=True)
        await self._end(node, reason)

    async def _require(self, node_id: str) -> NodeRecord:
        node = await self._node(node_id)
        if node is None:
            raise HerderError(f"no node {node_id!r}", node_id=node_id, status=404)
        return node

    async def _node(self, node_id: str) -> NodeRecord | None:
        return await self.store.node(node_id)

    async def _end(self, node: NodeRecord, reason: str) -> None:
        """Record the node terminated for ``reason`` and destroy its machine."""
        if node.state.is_alive:
            with contextlib.suppress(InvalidTransition):
                await self.store.set_node_state(node.id, NodeState.TERMINATED, reason, time.time())
            self.node_down(node, reason)
        if self.provider is not None and node.provider == self.provider.name:
            self._destroy_later(node.id, reason)

    # --- news from the coordinator ---------------------------------------------------

    async def prepare(self, node: NodeRecord) -> bool:
        """Run the herd's ``init_node`` step on a freshly paired node."""
        try:
            await self.herd.init_node(node)
        except Exception as exc:
            log.exception("init_node failed on %s", node.id)
            await self._record(
                "herd_callback_failed", node.id, {"step": "init_node", "error": repr(exc)}
            )
            await self.terminate(node.id, Reason.INIT_FAILED)
            return False
        return True

    def node_up(self, node: NodeRecord) -> None:
        self._down.discard(node.id)  # a lost node that came back can go down again
        if self.provider is not None and node.provider == self.provider.name:
            self.backoff.succeeded()  # the provider makes nodes that work again
        self._call("on_node_up", node)

    def node_down(self, node: NodeRecord, reason: str) -> None:
        """A node stopped serving; one of ours is destroyed through its provider
        (a lost cloud machine stops costing money)."""
        if node.id in self._down:
            return  # a goodbye, a closed socket and a terminate may all report one end
        self._down.add(node.id)
        self._call("on_node_down", node, reason)
        if self.provider is not None and node.provider == self.provider.name:
            self._destroy_later(node.id, reason)

    def telemetry(self, node: NodeRecord, data: dict[str, Any]) -> None:
        if self._on_telemetry:
            self._call("on_telemetry", node, data)

    def idle_seconds(self, node_id: str) -> float:
        load = self.link.loads().get(node_id)
        if load is None or load.idle_since is None:
            return 0.0
        return time.monotonic() - load.idle_since

    # --- destroying machines -----------------------------------------------------------

    def _destroy_later(self, node_id: str, reason: str) -> None:
        if node_id not in self._destroying:
            task = asyncio.create_task(self._destroy(node_id, reason), name=f"destroy-{node_id}")
            self._destroying[node_id] = task
            task.add_done_callback(lambda _: self._destroying.pop(node_id, None))

    async def _destroy(self, node_id: str, reason: str) -> None:
        assert self.provider is not None
        try:
            await asyncio.wait_for(
                self.provider.terminate(node_id, self.grace_s), self.spawn_timeout_s
            )
        except Exception as exc:  # the next inventory tries again
            log.error("%s: terminating %s failed: %s", self.provider.name, node_id, exc)
            await self._record(
                "provider_error", node_id, {"provider": self.provider.name, "terminate": str(exc)}
            )
            self._last_inventory = -math.inf
            return
        log.info("%s: node %s destroyed (%s)", self.provider.name, node_id, reason)
        node = await self._node(node_id)
        await self._record("node_destroyed", node_id, {"reason": reason})
        if node is not None:
            self._call("on_terminated", node)

    # --- callbacks and events -----------------------------------------------------------

    def _call(self, name: str, *args: Any) -> None:
        self._callbacks.put_nowait((name, args))

    async def _callback_worker(self) -> None:
        """Run herd callbacks one at a time, in the order things happened."""
        while True:
            name, args = await self._callbacks.get()
            method: Callable[..., Awaitable[None]] = getattr(self.herd, name)
            try:
                await method(*args)
            except Exception as exc:
                log.exception("herd callback %s failed", name)
                node = args[0] if args and isinstance(args[0], NodeRecord) else None
                await self._record(
                    "herd_callback_failed",
                    node.id if node is not None else None,
                    {"step": name, "error": repr(exc)},
                )

    async def _poll_events(self) -> None:
        for event in await self.store.events(after=self._last_event, limit=1000):
            self._last_event = event.id
            self._call("on_event", event)

    async def _record(self, action: str, node_id: str | None, data: dict[str, Any]) -> None:
        try:
            await self.store.add_event(action, time.time(), node_id=node_id, data=data)
        except HerderError as exc:
            log.error("event %s not recorded: %s", action, exc)


def _serving(load: NodeLoad | None) -> bool:
    return load is not None and load.ready and not load.draining
