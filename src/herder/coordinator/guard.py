"""Slow and greedy peers: a deadline for a request's headers, a cap of connections per
source, a cap on request bodies.

uvicorn waits for a request's headers for as long as a client cares to send
them, one byte at a time (slowloris): with enough such connections nobody
else is served. :class:`GuardedH11` is uvicorn's HTTP/1.1 protocol with a
deadline of ``HEADERS_S`` (to 1.2 × that) for each request's headers (the first, and each
next one on a kept-alive connection), and at most ``PER_SOURCE`` HTTP
connections open per source address. A connection upgraded to a WebSocket
leaves both: its peer then has ten seconds to authenticate, and the
WebSocket handlers close it otherwise.

:class:`BodyLimit` refuses request bodies over ``MAX_BODY_BYTES`` (413)
before they are read, except the datastore's uploads, which stream to disk.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADERS_S = 10.0
PER_SOURCE = 512
MAX_BODY_BYTES = 256 * 2**20  # a submission of a few hundred thousand tasks
STREAMED_PREFIX = "/v1/data/"  # datastore uploads: any size, streamed to disk


class ConnectionCounter:
    """HTTP connections open per source address (one per coordinator)."""

    def __init__(self, per_source: int = PER_SOURCE) -> None:
        self.per_source = per_source
        self.open: dict[str, int] = {}

    def admit(self, source: str) -> bool:
        if self.open.get(source, 0) >= self.per_source:
            return False
        self.open[source] = self.open.get(source, 0) + 1
        return True

    def leave(self, source: str) -> None:
        left = self.open.get(source, 0) - 1
        if left > 0:
            self.open[source] = left
        else:
            self.open.pop(source, None)


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a headers deadline and a per-source cap."""

    counter: ConnectionCounter  # set on the subclass made by :func:`guarded_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._source = self.client[0] if self.client else "?"
        self._counted = self.counter.admit(self._source)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object | None = None  # the request cycle whose successor is due
        if not self._counted:
            transport.close()  # too many from there: refused before a byte is read
            return
        self._arm()

    def _arm(self) -> None:
        self._waiting_for = self.cycle
        # spread a little: a thousand idle connections opened at once are not all
        # cut in the same loop turn (a pause every other client would feel)
        delay = HEADERS_S * (1 + 0.2 * random.random())
        self._deadline = asyncio.get_running_loop().call_later(delay, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.transport.abort()  # no TLS goodbye for a peer that never said hello

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._deadline is not None and self.cycle is not self._waiting_for:
            self._disarm()  # a request's headers are in: its body has its own limits

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._deadline is None:
            self._arm()  # kept alive: the next request's headers are due in time too

    def handle_websocket_upgrade(self, event: Any) -> None:
        self._release()
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        self._disarm()
        if self._counted:
            self._counted = False
            self.counter.leave(self._source)


def guarded_protocol(counter: ConnectionCounter) -> type[GuardedH11]:
    """The protocol class for one coordinator's server (its own counter)."""
    return type("GuardedH11", (GuardedH11,), {"counter": counter})


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is refused (413), by its declared
    length at once, or as soon as it grows past the limit."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(STREAMED_PREFIX):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooBig
            return message

        try:
            await self.app(scope, counted, send)
        except _TooBig:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        detail = f"body: larger than {self.limit} bytes (send big data through /v1/data)"
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


class _TooBig(Exception):
    """A body grew past the limit while the app read it."""
