"""``/v1/live``: what the dashboard shows, pushed as JSON over a WebSocket.

A browser cannot set an Authorization header on a WebSocket, so the first
message carries the token (``{"token": "..."}``); a wrong one (or none
within ``AUTH_TIMEOUT_S``) closes the socket with code 4401 before anything
is sent. Then, every ``SNAPSHOT_EVERY_S``, a snapshot (status counts and
executors), and the events since the last one: those stored (node changes,
retries, lost and cancelled tasks) and tasks that ended, which the store
counts rather than logs (``task_succeeded``, ``task_failed``, …, from
:class:`LiveFeed`). At most ``MAX_EVENTS`` a turn: a dashboard needs to see
that things happen, not every event of 10,000 tasks a second.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from herder.store.base import Final

from .auth import rule

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("herder.coordinator")

AUTH_TIMEOUT_S = 10.0
SNAPSHOT_EVERY_S = 1.0
MAX_EVENTS = 200
THROUGHPUT_WINDOW_S = 10.0


class LiveFeed:
    """Tasks that ended, for the live sockets open now (each has a bounded buffer)."""

    def __init__(self) -> None:
        # by identity: each open socket's buffer (a deque is not hashable)
        self._listeners: dict[int, collections.deque[dict[str, Any]]] = {}

    def listen(self) -> collections.deque[dict[str, Any]]:
        box: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        self._listeners[id(box)] = box
        return box

    def close(self, box: collections.deque[dict[str, Any]]) -> None:
        self._listeners.pop(id(box), None)

    def finals(self, finals: list[Final]) -> None:
        if not self._listeners:
            return
        now = time.time()
        for f in finals[-MAX_EVENTS:]:
            event = {
                "id": None,
                "at": now,
                "action": f"task_{f.state.value}",
                "task_id": f.task_id,
                "node_id": None,
                "data": {"reason": f.reason} if f.reason else {},
            }
            for box in self._listeners.values():
                box.append(event)


def live_router(coord: Coordinator) -> APIRouter:
    router = APIRouter()

    @router.websocket("/v1/live")
    async def live(ws: WebSocket) -> None:
        await ws.accept()
        try:
            first = await asyncio.wait_for(ws.receive(), AUTH_TIMEOUT_S)
            token = json.loads(first.get("text") or "{}").get("token", "")
        except (TimeoutError, ValueError, AttributeError, WebSocketDisconnect):
            token = ""  # silence, a binary frame, not JSON, not an object: no token
        who = coord.auth.principal(token) if isinstance(token, str) else None
        if who is None or not who.may(rule("WS", "/v1/live")):
            await ws.close(4401, "a valid token is required")
            return
        coord.live_sockets[ws] = who  # a revocation of its token closes it
        last_event = await coord.store.latest_event_id()
        ended = coord.feed.listen()
        try:
            while not coord.is_stopping:
                await ws.send_text(json.dumps(await snapshot(coord)))
                events = await coord.store.events(after=last_event, limit=MAX_EVENTS)
                outgoing = [e.model_dump(mode="json") for e in events]
                while ended:
                    outgoing.append(ended.popleft())
                for event in outgoing:
                    await ws.send_text(json.dumps({"type": "event", "event": event}))
                if events:
                    # more than a turn's worth: skip to the newest, never fall behind
                    last_event = max(events[-1].id, await coord.store.latest_event_id())
                await asyncio.sleep(SNAPSHOT_EVERY_S)
        except WebSocketDisconnect:
            return
        finally:
            coord.feed.close(ended)
            coord.live_sockets.pop(ws, None)

    return router


async def snapshot(coord: Coordinator) -> dict[str, Any]:
    """Counts, throughput and each node's state, slots and last reading."""
    now = time.time()
    nodes = await coord.store.nodes(alive_only=True)
    executors = []
    for n in nodes:
        session = coord.agents.get(n.id)
        reading = coord.telemetry.latest.get(n.id)
        executors.append(
            {
                "id": n.id,
                "name": n.name,
                "state": n.state.value,
                "labels": n.labels,
                "slots": n.slots,
                "used": min(n.slots, len(session.outstanding)) if session else 0,
                "telemetry": reading[1] if reading else None,
            }
        )
    done = await coord.store.finished_since(now - THROUGHPUT_WINDOW_S)
    return {
        "type": "snapshot",
        "at": now,
        "status": {
            "counts": await coord.counts(),
            "agents": len(coord.agents),
            "throughput": done / THROUGHPUT_WINDOW_S,
        },
        "executors": executors,
    }
