"""Watch the instance metadata service for a spot interruption notice.

EC2 warns a spot instance about two minutes before it takes it back:
``/latest/meta-data/spot/instance-action`` answers 404 until then, and
``{"action": "terminate", "time": "..."}`` once the instance is doomed.
Two minutes are enough to hand every lease back at once, which is far
better for the queue than letting the leases expire after the machine is
gone (late, and charged an attempt).

The watcher speaks IMDSv2 (a session token from ``PUT /latest/api/token``,
sent with every read), and falls back to plain reads where the token
cannot be had (IMDSv1, or a stand-in that does not issue tokens). A
metadata service that cannot be reached is logged once and asked again at
the next poll: missing a notice must never take the agent down.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

log = logging.getLogger("herder.agent.spot")

TOKEN_PATH = "/latest/api/token"
NOTICE_PATH = "/latest/meta-data/spot/instance-action"
TOKEN_TTL_S = 6 * 3600
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class SpotNotice:
    """The cloud's announcement: what it will do to the instance (``terminate``,
    ``stop``, ``hibernate``) and when (its own ISO 8601 string)."""

    action: str
    time: str


class SpotWatcher:
    """``await SpotWatcher(url).wait_notice()`` returns once a notice is posted.

    Plain ``urllib`` in a thread, not httpx: a poll every few seconds for
    the life of the machine must not write a log line each time, and no
    proxy from the environment may stand between the agent and the
    link-local metadata service.
    """

    def __init__(self, url: str, *, poll_s: float = 5.0, timeout_s: float = 2.0) -> None:
        self.url = url.rstrip("/")
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None
        self._token_until = 0.0
        self._unreachable_logged = False

    async def wait_notice(self) -> SpotNotice:
        while True:
            notice = await self.poll()
            if notice is not None:
                return notice
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> SpotNotice | None:
        """One look: the notice, or None (none yet, or the service did not answer)."""
        try:
            notice = await asyncio.to_thread(self.read_notice)
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            self._token = None
            if not self._unreachable_logged:
                self._unreachable_logged = True
                log.warning(
                    "instance metadata at %s unavailable (%s: %s); still polling every %gs",
                    self.url,
                    type(exc).__name__,
                    exc,
                    self.poll_s,
                    extra={"action": "spot_watch_unavailable"},
                )
            return None
        if self._unreachable_logged:
            self._unreachable_logged = False
            log.info("instance metadata at %s answers again", self.url)
        return notice

    def read_notice(self) -> SpotNotice | None:
        """Blocking: ask once (a token first, when the one held is old)."""
        headers = self._auth()
        status, body = self._request("GET", NOTICE_PATH, headers)
        log.debug("spot notice poll: %d", status)
        if status == 401:  # the session token expired: a new one next time
            self._token = None
            return None
        if status == 404:
            return None
        if status != 200:
            raise ValueError(f"HTTP {status} from {NOTICE_PATH}")
        notice = json.loads(body)
        return SpotNotice(action=str(notice["action"]), time=str(notice.get("time", "")))

    def _auth(self) -> dict[str, str]:
        """The IMDSv2 token header; empty where the service issues no tokens (IMDSv1)."""
        now = time.monotonic()
        if self._token is None or now >= self._token_until:
            status, body = self._request(
                "PUT", TOKEN_PATH, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_S)}
            )
            if status != 200:
                return {}
            self._token = body.decode().strip()
            self._token_until = now + TOKEN_TTL_S / 2
        return {"X-aws-ec2-metadata-token": self._token}

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                return int(response.status), response.read(MAX_BODY_BYTES)
        except urllib.error.HTTPError as exc:  # an answer all the same (404, 401, ...)
            with exc:
                return exc.code, b""
