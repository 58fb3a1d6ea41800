"""Refuse requests whose ``Host`` or ``Origin`` is not this coordinator (DNS rebinding, CSRF).

A web page on ``evil.example`` whose name an attacker points at 127.0.0.1
makes the browser send requests to the coordinator with ``Host:
evil.example`` (DNS rebinding); a page on any site can make a browser send
``Origin: https://evil.example`` to a coordinator it can reach (CSRF,
cross-site WebSockets). A bearer token already stops both from reading or
changing anything, but a guard that refuses them outright leaves nothing
to chance: only the names this coordinator is reached by are accepted
(its listen and advertised addresses, the host's names and addresses,
loopback, and ``allowed_hosts`` from the settings).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.parse
from collections.abc import Iterable

import psutil
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK = ("localhost", "127.0.0.1", "::1")


def local_names(listen_host: str, advertised: Iterable[str]) -> set[str]:
    """The names and addresses a client of this host may use to reach it."""
    names = {*LOOPBACK, socket.gethostname(), socket.getfqdn()}
    names.update(urllib.parse.urlsplit(url).hostname or "" for url in advertised)
    if listen_host in ("0.0.0.0", "", "::"):
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(addr.address.split("%", 1)[0])
    else:
        names.add(listen_host)
    return {n.lower() for n in names if n}


def _hostname(value: str) -> str | None:
    """``host[:port]`` or ``[v6]:port`` as the bare, lower-case host; None if malformed."""
    parsed = urllib.parse.urlsplit("//" + value)
    try:
        host = parsed.hostname
        parsed.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        return None
    if host is None:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


class HostGuard:
    """ASGI middleware: HTTP and WebSocket requests with a foreign Host or Origin get 403."""

    def __init__(self, app: ASGIApp, allowed: set[str]) -> None:
        self.app = app
        self.allowed = {a.lower() for a in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        problem = self._problem(headers)
        if problem is None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4403, "reason": problem})
            return
        body = json.dumps({"detail": problem}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _problem(self, headers: dict[str, str]) -> str | None:
        host = _hostname(headers.get("host", ""))
        if host is None or host not in self.allowed:
            return "refused: the Host header does not name this coordinator"
        origin = headers.get("origin")
        if origin is not None:  # "null" too: a sandboxed page's or a file's
            origin_host = urllib.parse.urlsplit(origin).hostname
            if origin_host is None or _hostname(origin_host) != host:
                return "refused: a request from another site (Origin)"
        return None
