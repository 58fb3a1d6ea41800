"""Signed calls to a tracker (:mod:`herder.discovery.tracker`), and announcing to one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from .tracker import _AUTH, _TIME, ANNOUNCE_EVERY_S, Entry, TrackerError, _verify, log, sign

__all__ = ["TrackerClient", "announce_loop"]


class TrackerClient:
    """Signed calls to a tracker. ``async with TrackerClient(url, secret) as t: ...``

    TLS certificates are not verified: the answers are authenticated by
    their HMAC tag, which is what makes their content trustworthy.
    """

    def __init__(
        self,
        url: str,
        secret: bytes,
        *,
        timeout: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """``transport``: an httpx transport (tests pass ``httpx.ASGITransport(app)``)."""
        self.url = url.rstrip("/")
        self._secret = secret
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=timeout, verify=False, transport=transport
        )

    async def __aenter__(self) -> TrackerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: bytes = b"", **params: str) -> Any:
        ts = f"{time.time():.3f}"
        headers = {_TIME: ts, _AUTH: sign(self._secret, method, path, ts, body)}
        if body:
            headers["content-type"] = "application/json"
        try:
            answer = await self._http.request(
                method, path, content=body, headers=headers, params=params or None
            )
        except httpx.HTTPError as exc:
            raise TrackerError(f"tracker {self.url} unreachable: {exc!r}") from exc
        if answer.status_code != 200:
            raise TrackerError(f"tracker {self.url} answered {answer.status_code}: {answer.text}")
        why = _verify(
            self._secret,
            "RESPONSE",
            path,
            answer.headers.get(_TIME, ""),
            answer.headers.get(_AUTH, ""),
            answer.content,
        )
        if why is not None:
            raise TrackerError(f"tracker {self.url} answer refused: {why}")
        return answer.json()

    async def announce(self, entry: Entry) -> None:
        body = entry.model_dump_json(exclude={"address", "expires_in_s"}).encode()
        await self._call("POST", "/v1/announce", body)

    async def hosts(self, kind: str | None = None) -> list[Entry]:
        params = {"kind": kind} if kind else {}
        raw = await self._call("GET", "/v1/hosts", b"", **params)
        return [Entry.model_validate(e) for e in raw["hosts"]]

    async def find_coordinator(self, cluster: str | None = None) -> Entry | None:
        """A live coordinator with URLs and a fingerprint (of ``cluster`` if given)."""
        for entry in await self.hosts("coordinator"):
            if entry.urls and entry.fingerprint and cluster in (None, entry.cluster):
                return entry
        return None


async def announce_loop(
    client: TrackerClient, entry: Callable[[], Entry], every_s: float = ANNOUNCE_EVERY_S
) -> None:
    """Announce ``entry()`` every ``every_s`` until cancelled; failures are logged once
    per outage and retried, since a tracker that is down must not stop its users."""
    failing = False
    while True:
        try:
            await client.announce(entry())
            if failing:
                log.info("tracker %s reachable again", client.url)
            failing = False
        except TrackerError as exc:
            if not failing:
                log.warning("cannot announce to the tracker: %s", exc)
            failing = True
        await asyncio.sleep(every_s)
