"""The event bus: messages between clients and nodes, task progress, node availability.

- ``Send`` (from a client, or from a task through its agent) is relayed as
  ``Deliver`` to the agents its target names: a node id, ``"all"``, or a
  selector over node labels. Agents pass it to their running tasks'
  handlers (``herder.node.on``). Delivery is at most once and only to
  nodes connected now: the bus carries notes, the queue carries work.
- ``Emit`` and node discovery events (``node_available`` /
  ``node_unavailable``) are pushed to every connected client as ``Event``;
  clients keep them for a TTL so late listeners still see them.
- ``Progress`` of running tasks is kept here (a cache, one entry per
  running task, dropped when the task ends or is requeued) and pushed to
  the clients watching the task.
- Pause / resume: a paused node takes no new claims, finishes what it
  runs and stays paired. The store keeps the flag (``nodes.paused``, with
  a ``node_paused``/``node_resumed`` event), so a restarted coordinator
  still holds the node back; ``paused`` here is its cache.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException

from herder import protocol, selector
from herder.model import ID_PATTERN

from .sessions import AgentSession, ClientSession

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("herder.coordinator")


@dataclass(frozen=True)
class TaskProgress:
    """The last progress a running task reported."""

    lease_id: str
    job_id: str
    fraction: float
    message: str
    at: float

    def as_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "message": self.message, "at": self.at}


class Bus:
    def __init__(self, coord: Coordinator) -> None:
        self._coord = coord
        self.progress: dict[str, TaskProgress] = {}
        self.paused: set[str] = set()
        self.sent = 0  # messages delivered to nodes, for statistics

    # --- targets -----------------------------------------------------------------

    def targets(self, target: str) -> list[AgentSession]:
        """The connected, ready agents ``target`` names: ``"all"``, a node id, or a
        selector (:mod:`herder.selector`) over each node's labels, data and resources.

        A target that is no selector but reads as a node id names a node not
        connected now: nobody. Any other bad selector raises
        :class:`~herder.selector.SelectorError` naming the bad token.
        """
        agents = [a for a in self._coord.agents.values() if a.ready and not a.closed]
        if target == "all":
            return agents
        by_id = [a for a in agents if a.node_id == target]
        if by_id:
            return by_id
        try:
            tree = selector.parse(target)
        except selector.SelectorError:
            if re.fullmatch(ID_PATTERN, target):
                return []
            raise
        return [a for a in agents if selector.evaluate(tree, _facts(a))]

    def send(self, target: str, topic: str, data: Any, sender: str, *, relay: bool = True) -> int:
        """Deliver to every node ``target`` names; how many it went to here (``relay``:
        the other coordinators of the store deliver to theirs too, uncounted)."""
        agents = self.targets(target)
        if relay:
            self._coord.peers.relay("send", target=target, topic=topic, data=data, sender=sender)
        if agents:
            message = protocol.Deliver(topic=topic, data=data, sender=sender)
            for agent in agents:
                self._coord._spawn(agent.send(message))
            self.sent += len(agents)
        return len(agents)

    # --- from agents -------------------------------------------------------------

    def on_agent(
        self, session: AgentSession, msg: protocol.Send | protocol.Emit | protocol.Progress
    ) -> None:
        if isinstance(msg, protocol.Send):
            try:
                self.send(msg.target, msg.topic, msg.data, session.node_id)
            except selector.SelectorError as exc:  # the task's mistake: not delivered
                log.warning(
                    "task %s sent to a bad target: %s",
                    msg.task_id,
                    exc,
                    extra={"action": "bus_refused", "task_id": msg.task_id},
                )
        elif isinstance(msg, protocol.Emit):
            self.broadcast(
                protocol.Event(
                    kind="emit",
                    at=time.time(),
                    node_id=session.node_id,
                    task_id=msg.task_id,
                    topic=msg.topic,
                    data=msg.data,
                )
            )
        elif msg.lease_id in session.outstanding:  # not from a lease that was taken back
            p = TaskProgress(msg.lease_id, msg.job_id, msg.fraction, msg.message, time.time())
            self.progress[msg.task_id] = p
            event = protocol.Event(kind="progress", at=p.at, task_id=msg.task_id, data=p.as_json())
            for client in self._coord.watchers.get(msg.task_id, ()):
                self._coord._spawn(client.send(event))

    def drop(self, task_ids: list[str]) -> None:
        """The tasks ended or went back to the queue: their progress is history."""
        for task_id in task_ids:
            self.progress.pop(task_id, None)

    def job_progress(self, job_id: str) -> dict[str, Any] | None:
        """The average progress of a job's running tasks that reported some."""
        ps = [p.fraction for p in self.progress.values() if p.job_id == job_id]
        if not ps:
            return None
        return {"running_reported": len(ps), "average": sum(ps) / len(ps)}

    # --- to clients --------------------------------------------------------------

    def broadcast(self, event: protocol.Event, *, relay: bool = True) -> None:
        """Push ``event`` to our clients (``relay``: and the other coordinators' clients)."""
        if relay and self._coord.peers.shared:
            try:
                dumped = event.model_dump(mode="json")
            except ValueError as exc:  # e.g. an error nested too deep for JSON
                log.warning("event %s not relayed to the other coordinators: %s", event.kind, exc)
            else:
                self._coord.peers.relay("event", event=dumped)
        clients: set[ClientSession] = self._coord.clients
        for client in clients:
            self._coord._spawn(client.send(event))

    def node_event(self, kind: str, node_id: str, reason: str | None = None) -> None:
        """A node became ready (``node_available``) or lost, terminated, draining or
        paused (``node_unavailable``)."""
        self.broadcast(
            protocol.Event(
                kind=kind,  # type: ignore[arg-type]
                at=time.time(),
                node_id=node_id,
                data={"reason": reason} if reason else None,
            )
        )

    # --- availability ------------------------------------------------------------

    async def set_available(self, node_id: str, available: bool) -> None:
        """Pause (no new claims, running tasks finish, stays paired) or resume a node."""
        known = {n.id for n in await self._coord.store.nodes(alive_only=True)}
        if node_id not in known and node_id not in self._coord.agents:
            raise HTTPException(404, f"no live node {node_id}")
        if available == (node_id not in self.paused):
            return
        await self._coord.store.set_node_paused(node_id, not available, time.time())
        if available:
            self.paused.discard(node_id)
            self._coord._wake.set()
        else:
            self.paused.add(node_id)
        self.node_event(
            "node_available" if available else "node_unavailable",
            node_id,
            None if available else "paused",
        )


def bus_router(coord: Coordinator) -> APIRouter:
    """``POST /v1/nodes/{id}/pause`` and ``/resume``: by node id, so it works from
    anywhere the API is reachable (``herder pause NODE``)."""
    router = APIRouter()

    @router.post("/v1/nodes/{node_id}/pause")
    async def pause(node_id: str) -> dict[str, Any]:
        await coord.bus.set_available(node_id, False)
        return {"node": node_id, "available": False}

    @router.post("/v1/nodes/{node_id}/resume")
    async def resume(node_id: str) -> dict[str, Any]:
        await coord.bus.set_available(node_id, True)
        return {"node": node_id, "available": True}

    return router


async def answer_send(coord: Coordinator, client: ClientSession, msg: protocol.Send) -> None:
    """A client's ``Send`` on its session channel: relay, then say to how many nodes."""
    try:
        delivered = coord.bus.send(msg.target, msg.topic, msg.data, "client")
    except selector.SelectorError as exc:
        await client.send(protocol.Sent(req=msg.req, error=str(exc)))
        return
    await client.send(protocol.Sent(req=msg.req, delivered=delivered))


def _facts(agent: AgentSession) -> selector.Facts:
    """What a selector is evaluated on: the node's id, labels, data and resources."""
    f = agent.facts
    return selector.Facts(
        node=agent.node_id, labels=f.labels or agent.labels, data=f.data, resources=f.resources
    )


__all__ = ["Bus", "TaskProgress", "answer_send", "bus_router"]
