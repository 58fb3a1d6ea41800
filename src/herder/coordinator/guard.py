"""Slow and greedy peers: a deadline for the TLS handshake and for a request's headers,
a cap of connections per source, a cap on request bodies.

uvicorn waits for a request's headers for as long as a client cares to send
them, one byte at a time (slowloris), and asyncio gives a TLS handshake a
minute: with enough such connections nobody else is served. So the
coordinator does TLS itself. :class:`TlsAcceptor` (the protocol uvicorn
creates for each accepted connection) counts the connection against its
source at once, before a byte is read (at most ``PER_SOURCE`` per source
address), gives the handshake ``HANDSHAKE_S``, and then hands the TLS
connection to :class:`GuardedH11`: uvicorn's HTTP/1.1 protocol with a
deadline of ``HEADERS_S`` (to 1.2 × that) for each request's headers (the
first, and each next one on a kept-alive connection). A connection upgraded
to a WebSocket leaves both: its peer then has ten seconds to authenticate,
and the WebSocket handlers close it otherwise.

:class:`TlsWebSocketProtocol` puts what the TLS layer verified about the peer
(the ASGI ``tls`` extension: ``client_cert_chain``) into each WebSocket's
scope, so that the agent route can ask for a client certificate (mutual
TLS).

:class:`BodyLimit` refuses request bodies over ``MAX_BODY_BYTES`` (413)
before they are read, except the datastore's uploads, which stream to disk.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
from collections.abc import Coroutine
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

HANDSHAKE_S = 10.0
HEADERS_S = 10.0
PER_SOURCE = 512
MAX_BODY_BYTES = 256 * 2**20  # a submission of a few hundred thousand tasks
STREAMED_PREFIX = "/v1/data/"  # datastore uploads: any size, streamed to disk


class ConnectionCounter:
    """Connections open per source address (one per coordinator), counted from accept."""

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


class Ticket:
    """One admitted connection's place in its source's count; given back once."""

    def __init__(self, counter: ConnectionCounter, source: str) -> None:
        self._counter = counter
        self.source = source
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._counter.leave(self.source)


class TlsGate:
    """What one coordinator's acceptors share: the server TLS context, the per-source
    counter, the handshake deadline, and the handshakes under way (so that a stop
    can end them rather than leave them to their deadline)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        counter: ConnectionCounter,
        handshake_s: float = HANDSHAKE_S,
    ) -> None:
        self.context = context
        self.counter = counter
        self.handshake_s = handshake_s
        self._handshakes: set[asyncio.Task[None]] = set()

    def admit(self, source: str) -> Ticket | None:
        return Ticket(self.counter, source) if self.counter.admit(source) else None

    def start(self, handshake: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(handshake, name="tls-handshake")
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def handshaking(self) -> int:
        """Connections accepted whose TLS handshake has not finished yet."""
        return len(self._handshakes)

    def close(self) -> None:
        """End the handshakes under way (the server has stopped accepting)."""
        for task in list(self._handshakes):
            task.cancel()


class TlsAcceptor(asyncio.Protocol):
    """An accepted TCP connection until its TLS handshake is done; then GuardedH11's.

    uvicorn builds one per accepted connection (it is the server's
    ``http`` protocol class) with the keyword arguments meant for its HTTP
    protocol, which are passed on. Between the handshake's end and the hand
    over, bytes that already arrived are kept and replayed, so a client that
    sends its request right behind its ``Finished`` loses nothing.
    """

    # both set on the subclass made by :func:`guarded_protocol`
    gate: TlsGate
    gate_protocol: type[GuardedH11]

    def __init__(self, **uvicorn_kwargs: Any) -> None:
        self._kwargs = uvicorn_kwargs
        self._ticket: Ticket | None = None
        self._early = bytearray()
        self._eof = False
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        peer = transport.get_extra_info("peername")
        self._ticket = self.gate.admit(str(peer[0]) if peer else "?")
        if self._ticket is None:
            transport.abort()  # too many from there: refused before a byte is read
            return
        transport.pause_reading()  # the ClientHello is for the TLS layer, not for us
        self.gate.start(self._handshake(transport))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        assert self._ticket is not None
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                raw,
                self,
                self.gate.context,
                server_side=True,
                ssl_handshake_timeout=self.gate.handshake_s,
            )
        except (OSError, TimeoutError):  # too slow, not TLS, an untrusted client certificate
            raw.abort()
            self._ticket.release()
            return
        except asyncio.CancelledError:
            raw.abort()
            self._ticket.release()
            raise
        if tls is None or self._lost:
            self._ticket.release()
            return
        app = self.gate_protocol(**self._kwargs)
        app.ticket = self._ticket
        tls.set_protocol(app)
        app.connection_made(tls)
        if self._early:
            app.data_received(bytes(self._early))
        if self._eof:
            app.eof_received()

    def data_received(self, data: bytes) -> None:
        self._early += data

    def eof_received(self) -> bool | None:
        self._eof = True
        return True  # half-closed: the HTTP protocol decides once it has the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a headers deadline; its connection's place in
    the per-source count (``ticket``) is given back when it closes or upgrades."""

    ticket: Ticket  # set by the TlsAcceptor that hands the connection over

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: object | None = None  # the request cycle whose successor is due
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
        self.transport.abort()  # no TLS goodbye for a peer that never sent a request

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
        self.ticket.release()


class TlsWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with the ASGI ``tls`` extension in each scope.

    ``client_cert_chain`` holds the PEM of the client certificate the TLS
    layer verified against the cluster CA (empty when the client sent none;
    a certificate that does not verify ends the handshake, so it never gets
    here).
    """

    async def run_asgi(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        self.scope["extensions"]["tls"] = {"client_cert_chain": chain, "client_cert_error": None}
        await super().run_asgi()


def guarded_protocol(gate: TlsGate) -> type[TlsAcceptor]:
    """The connection protocol class for one coordinator's server (its own gate)."""
    return type("TlsAcceptor", (TlsAcceptor,), {"gate": gate, "gate_protocol": GuardedH11})


def client_certificate(scope: Scope) -> str | None:
    """The PEM of the client certificate TLS verified for this WebSocket, if any."""
    chain = scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    return str(chain[0]) if chain else None


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
