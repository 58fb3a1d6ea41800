"""The tracker: a rendezvous service for coordinators and agents on different subnets.

``POST /v1/announce`` records (or refreshes) an entry ``{kind, id, urls,
data, fingerprint, cluster}``; ``GET /v1/hosts`` lists the live entries.
Entries expire ``ttl_s`` (default 10 s) after their last announcement, and
announcers repeat every 3 s, so a host that vanishes drops out within one TTL.

Authentication works over plain HTTP without the secret ever travelling:
every request carries ``X-Herder-Time`` and ``X-Herder-Auth``, an
HMAC-SHA256 (under a key derived from the secret with the label
``herder-tracker``) over method, path, timestamp and body; requests stamped
more than 30 s away from the tracker's clock are refused, which bounds
replays to that window (a replayed announce only refreshes an entry its
owner is refreshing anyway). Answers are signed the same way, so a client
can trust the addresses and fingerprints it reads even over plain HTTP or
over a TLS connection it does not verify (the coordinator serving these
routes itself with ``--serve-tracker`` uses its private CA).

The client side is :mod:`herder.discovery.tracker_client` (it needs httpx,
which a coordinator that serves no tracker calls has no use for).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, ValidationError

__all__ = [
    "DEFAULT_TTL_S",
    "TRACKER_PORT",
    "Entry",
    "Registry",
    "TrackerError",
    "sign",
    "tracker_app",
    "tracker_router",
]

log = logging.getLogger("herder.discovery")

TRACKER_PORT = 7422
DEFAULT_TTL_S = 10.0
ANNOUNCE_EVERY_S = 3.0
MAX_SKEW_S = 30.0
MAX_BODY_BYTES = 64 * 1024
_KEY_LABEL = b"herder-tracker"
_TIME = "x-herder-time"
_AUTH = "x-herder-auth"


class TrackerError(Exception):
    """The tracker could not be reached or gave an answer that does not verify."""


class Entry(BaseModel):
    """One announced host."""

    kind: Literal["coordinator", "agent"]
    id: str = Field(min_length=1, max_length=128)
    urls: list[str] = Field(default_factory=list, max_length=32)
    data: dict[str, Any] = Field(default_factory=dict)
    fingerprint: str | None = Field(default=None, max_length=64)
    cluster: str | None = Field(default=None, max_length=128)
    address: str | None = None  # filled in by the tracker: where the announce came from
    expires_in_s: float | None = None  # filled in by the tracker in answers


def _key(secret: bytes) -> bytes:
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


def sign(secret: bytes, method: str, path: str, ts: str, body: bytes) -> str:
    """The tag of one request (or, with method ``RESPONSE``, one answer)."""
    message = f"{method.upper()}\n{path}\n{ts}\n".encode() + body
    return hmac.new(_key(secret), message, hashlib.sha256).hexdigest()


def _verify(secret: bytes, method: str, path: str, ts: str, tag: str, body: bytes) -> str | None:
    """None if the tag and timestamp are good, else why not."""
    try:
        stamped = float(ts)
    except ValueError:
        return "missing or malformed timestamp"
    if abs(time.time() - stamped) > MAX_SKEW_S:
        return "stale timestamp"
    if not hmac.compare_digest(sign(secret, method, path, ts, body), tag):
        return "bad signature"
    return None


class Registry:
    """The tracker's state: entries by (kind, id) with an expiry. Memory only, on purpose:
    entries are refreshed every few seconds, so a restarted tracker is whole again
    within one announce period."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[tuple[str, str], tuple[Entry, float]] = {}

    def announce(self, entry: Entry) -> None:
        self._entries[(entry.kind, entry.id)] = (entry, self._clock() + self.ttl_s)

    def hosts(self, kind: str | None = None) -> list[Entry]:
        now = self._clock()
        for key in [k for k, (_, exp) in self._entries.items() if exp <= now]:
            del self._entries[key]
        return [
            entry.model_copy(update={"expires_in_s": round(exp - now, 3)})
            for (k, _), (entry, exp) in sorted(self._entries.items())
            if kind is None or k == kind
        ]


def tracker_router(secret: bytes, registry: Registry) -> APIRouter:
    """The two tracker routes, for a standalone tracker or a coordinator (--serve-tracker)."""
    router = APIRouter()

    async def authenticated_body(request: Request) -> bytes:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"body larger than {MAX_BODY_BYTES} bytes")
        why = _verify(
            secret,
            request.method,
            request.url.path,
            request.headers.get(_TIME, ""),
            request.headers.get(_AUTH, ""),
            body,
        )
        if why is not None:
            raise HTTPException(401, f"tracker authentication failed: {why}")
        return body

    def signed(path: str, payload: Any) -> Response:
        body = json.dumps(payload, separators=(",", ":")).encode()
        ts = f"{time.time():.3f}"
        headers = {_TIME: ts, _AUTH: sign(secret, "RESPONSE", path, ts, body)}
        return Response(body, media_type="application/json", headers=headers)

    @router.post("/v1/announce")
    async def announce(request: Request) -> Response:
        body = await authenticated_body(request)
        try:
            entry = Entry.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, str(exc.errors(include_url=False)[0]["msg"])) from exc
        peer = request.client.host if request.client else None
        registry.announce(entry.model_copy(update={"address": peer, "expires_in_s": None}))
        return signed("/v1/announce", {"ok": True, "ttl_s": registry.ttl_s})

    @router.get("/v1/hosts")
    async def hosts(request: Request, kind: str | None = None) -> Response:
        await authenticated_body(request)
        entries = [e.model_dump() for e in registry.hosts(kind)]
        return signed("/v1/hosts", {"hosts": entries})

    return router


def tracker_app(secret: bytes, ttl_s: float = DEFAULT_TTL_S) -> FastAPI:
    """The standalone tracker (``herder tracker``)."""
    app = FastAPI(title="herder tracker", version="1")
    app.include_router(tracker_router(secret, Registry(ttl_s)))
    return app
