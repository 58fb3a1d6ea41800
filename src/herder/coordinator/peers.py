"""The other coordinators of the store: presence, queue hints, finished tasks, bus notes.

Several coordinators may share one PostgreSQL store. Each keeps in memory
only hints of the queue (``_ready_hint``, ``_known_ckeys``) and the clients
watching tasks; the store holds the truth. What one coordinator commits the
others learn by ``NOTIFY`` (:class:`herder.store.pg_cluster.Channel`), batched:
one notification carries what several transactions did (how many tasks
became ready, the constraint keys submitted, the tasks that finished, bus
events and messages). A missed notification costs latency, not correctness:
:meth:`Peers.refresh_loop` reads the queue and the watched tasks' results
from the store every few seconds.

Presence: once a second, one statement records every node whose session
this coordinator holds (``nodes.coordinator``, ``nodes.last_seen``). The
leader's :meth:`Peers.sweep_loop` declares lost, and requeues the leases of,
nodes no coordinator has heard for ``lost_after_s`` plus
:data:`PRESENCE_MARGIN_S` (the agents of a coordinator that died), unless
they reconnect to another coordinator first.

On SQLite (one coordinator per store) presence and the sweep run as well
(a restarted coordinator finds the nodes that did not come back); there is
no channel.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from herder import protocol
from herder.errors import StoreError
from herder.fleet import NodeLoad
from herder.model import NodeRecord, NodeState, Reason, TaskState
from herder.store.base import Final
from herder.store.cluster import MAX_PAYLOAD, peer_channel

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("herder.coordinator")

PRESENCE_S = 1.0  # how often a coordinator records the nodes it hears
PRESENCE_MARGIN_S = 3.0  # beyond lost_after_s: a late presence write is no death
PUBLISH_EVERY_S = 0.01  # notifications of one such period go out together
REFRESH_S = 2.0  # the safety net: ready tasks, watched tasks' results
KEYS_REFRESH_S = 10.0


class Peers:
    """This coordinator's side of sharing a store with others."""

    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self.id = coord.id
        self._channel = peer_channel(coord.settings.store_url, self._received)
        self._ready = 0
        self._keys: set[str] = set()
        self._finals: list[tuple[str, str]] = []
        self._bus: list[dict[str, Any]] = []
        self._pending = asyncio.Event()
        self._fetch: set[str] = set()  # watched tasks that finished elsewhere
        self._fetching = asyncio.Event()
        self.published = 0
        self.received = 0
        # nodes the other coordinators serve, as the store says (for the fleet's view)
        self._remote: dict[str, NodeLoad] = {}

    def remote_loads(self) -> dict[str, NodeLoad]:
        """Nodes other coordinators serve now: the fleet's leader counts them as
        paired (not as nodes still booting), and drains them through their
        coordinator (:meth:`relay` ``drain``)."""
        return dict(self._remote)

    @property
    def shared(self) -> bool:
        """Whether other coordinators may share this store (PostgreSQL)."""
        return self._channel is not None

    async def open(self) -> None:
        if self._channel is not None:
            await self._channel.open()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    # --- telling the others ------------------------------------------------------------

    def note(
        self,
        *,
        ready: int = 0,
        ckeys: Iterable[str] = (),
        finals: Iterable[Final] = (),
    ) -> None:
        """What a commit of ours did, for the next notification."""
        if self._channel is None:
            return
        self._ready += ready
        self._keys.update(ckeys)
        self._finals.extend((f.task_id, f.state.value) for f in finals)
        if self._ready or self._keys or self._finals:
            self._pending.set()

    def relay(self, kind: str, **data: Any) -> None:
        """A bus event (``kind`` "event") or message (``kind`` "send") for the others'
        clients and agents."""
        if self._channel is None:
            return
        self._bus.append({"kind": kind, **data})
        self._pending.set()

    async def publish_loop(self) -> None:
        """Send what was noted, every :data:`PUBLISH_EVERY_S` at most."""
        if self._channel is None:
            return
        while True:
            await self._pending.wait()
            await asyncio.sleep(PUBLISH_EVERY_S)
            self._pending.clear()
            payloads = self._payloads()
            try:
                await self._channel.publish(payloads)
            except StoreError as exc:  # the others find it in the store (refresh_loop)
                log.warning("peers not told of %d notes: %s", len(payloads), exc)
                continue
            self.published += len(payloads)

    def _payloads(self) -> list[str]:
        ready, self._ready = self._ready, 0
        keys, self._keys = sorted(self._keys), set()
        finals, self._finals = self._finals, []
        bus, self._bus = self._bus, []
        out: list[str] = []
        head: dict[str, Any] = {"c": self.id, "r": ready, "k": []}
        for key in keys:  # keys are short; a long one rides alone
            if len(json.dumps(head)) + len(key) + 8 > MAX_PAYLOAD:
                out.append(json.dumps(head))
                head = {"c": self.id, "r": 0, "k": []}
            head["k"].append(key)
        if head["r"] or head["k"]:
            out.append(json.dumps(head))
        chunk: list[tuple[str, str]] = []
        size = 40
        for tid, state in finals:
            size += len(tid) + len(state) + 8
            chunk.append((tid, state))
            if size > MAX_PAYLOAD - 200:
                out.append(json.dumps({"c": self.id, "f": chunk}))
                chunk, size = [], 40
        if chunk:
            out.append(json.dumps({"c": self.id, "f": chunk}))
        for note in bus:
            try:
                text = json.dumps({"c": self.id, "b": note})
            except (TypeError, ValueError):
                log.warning("bus %s is not JSON: not relayed to other coordinators", note["kind"])
                continue
            if len(text.encode()) > MAX_PAYLOAD:
                log.warning("bus %s too large for other coordinators: not relayed", note["kind"])
                continue
            out.append(text)
        return out

    # --- hearing from them -------------------------------------------------------------

    def _received(self, payload: str) -> None:
        try:
            note = json.loads(payload)
        except ValueError:
            log.warning("peer channel: a payload that is not JSON: %.80s", payload)
            return
        if not isinstance(note, dict) or note.get("c") == self.id:
            return
        self.received += 1
        coord = self._coord
        ready = int(note.get("r") or 0)
        keys = note.get("k") or []
        if keys:
            coord._known_ckeys.update(str(k) for k in keys)
        if ready or keys:
            coord._ready_hint += max(ready, 1)
            coord._wake.set()
        finals = note.get("f") or []
        if finals:
            self._finished_elsewhere([(str(t), str(s)) for t, s in finals])
        if "b" in note:
            self._bus_note(note["b"])

    def _finished_elsewhere(self, finals: list[tuple[str, str]]) -> None:
        coord = self._coord
        coord.feed.finals([Final(task_id=t, state=TaskState(s)) for t, s in finals])
        watched = [t for t, _ in finals if t in coord.watchers]
        if watched:
            self._fetch.update(watched)
            self._fetching.set()

    def _bus_note(self, note: dict[str, Any]) -> None:
        coord = self._coord
        if note.get("kind") == "event":
            event = protocol.Event.model_validate(note["event"])
            coord.bus.broadcast(event, relay=False)
        elif note.get("kind") == "drain" and note.get("node_id") in coord.agents:
            drain = coord.drain(
                str(note["node_id"]), str(note["reason"]), kill=bool(note.get("kill"))
            )
            coord._spawn(drain)
        elif note.get("kind") == "send":
            coord.bus.send(
                str(note["target"]),
                str(note["topic"]),
                note.get("data"),
                str(note["sender"]),
                relay=False,
            )

    async def finals_loop(self) -> None:
        """Tell our watchers the results of their tasks that finished elsewhere."""
        while True:
            await self._fetching.wait()
            self._fetching.clear()
            ids, self._fetch = sorted(self._fetch), set()
            try:
                finals = await self._coord.store.finals(ids)
            except StoreError as exc:  # refresh_loop asks again
                log.warning("results of %d watched tasks not read: %s", len(ids), exc)
                continue
            self._coord._notify(finals)

    async def refresh_loop(self) -> None:
        """The safety net under the notifications: what a missed one would have said."""
        if self._channel is None:
            return
        coord = self._coord
        keys_at = time.monotonic()
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                if not self._channel.is_open:
                    await self._channel.open()
                if time.monotonic() - keys_at >= KEYS_REFRESH_S:
                    keys_at = time.monotonic()
                    coord._known_ckeys.update(await coord.store.ready_constraint_keys())
                if coord._ready_hint <= 0 and coord.agents:
                    found = await coord.store.count_ready(list(coord._known_ckeys), 1)
                    if found:
                        coord._ready_hint += found
                        coord._wake.set()
                if coord.watchers:
                    coord._notify(await coord.store.finals(list(coord.watchers)))
            except StoreError as exc:
                log.warning("peer refresh postponed: %s", exc)

    # --- presence and the sweep --------------------------------------------------------

    async def presence_loop(self) -> None:
        """Record, once a second and in one statement, the nodes this coordinator hears."""
        coord = self._coord
        lost_after = coord.settings.timeouts.lost_after_s
        while True:
            await asyncio.sleep(PRESENCE_S)
            now_m = time.monotonic()
            heard = [
                a.node_id
                for a in coord.agents.values()
                if not a.closed and now_m - a.last_heard <= lost_after
            ]
            now = time.time()
            try:
                await coord.store.touch_nodes(self.id, heard, now, stale_before=now - lost_after)
                if self.shared:
                    elsewhere = await coord.store.held_elsewhere(self.id, now - lost_after)
                    self._remote = {n.id: _load(n) for n in elsewhere}
            except StoreError as exc:  # the margin covers a late write; the next one comes
                log.warning("presence of %d nodes not recorded: %s", len(heard), exc)

    async def sweep_loop(self, leading_since: float) -> None:
        """The leader's: nodes no coordinator heard for long are lost, their leases requeued.

        Starts ``lost_after_s`` after leadership was gained (monotonic
        ``leading_since``), so nodes whose coordinator just died, or that
        wait for a restarted one, get that long to reconnect somewhere.
        """
        coord = self._coord
        lost_after = coord.settings.timeouts.lost_after_s
        await asyncio.sleep(max(0.0, leading_since + lost_after - time.monotonic()))
        while True:
            try:
                await coord.lose_silent(
                    silent_before=time.time() - lost_after - PRESENCE_MARGIN_S,
                    reason=Reason.LOST_HEARTBEAT,
                    exclude=set(coord.agents),
                )
            except StoreError as exc:
                log.error("silent-node sweep postponed: %s", exc)
            await asyncio.sleep(PRESENCE_S)


def _load(node: NodeRecord) -> NodeLoad:
    """A node another coordinator serves, as far as its store record tells."""
    return NodeLoad(
        slots=node.slots,
        running=1 if node.state is NodeState.BUSY else 0,
        idle_since=None,
        ready=node.state in (NodeState.READY, NodeState.BUSY),
        draining=node.state is NodeState.DRAINING,
    )
