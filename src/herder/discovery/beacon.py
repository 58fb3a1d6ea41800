"""UDP beacon: a coordinator announces itself on its subnets; agents listen and pair.

Every second the coordinator broadcasts one datagram on port 7421 holding its
cluster id, its URLs and its CA fingerprint, signed with HMAC-SHA256 under a
key derived from the cluster secret (``HMAC(secret, b"herder-beacon")``), so
the secret itself never keys anything but its own derivations.

Why an agent may trust the fingerprint it reads from a beacon: only a holder
of the secret can produce a valid tag, and a holder of the secret can already
run code on the herd. A beacon is therefore as trustworthy as a join token;
the pairing handshake that follows still proves the secret both ways.

The listener faces an open port, so it is built to never raise on input:
datagrams larger than :data:`MAX_BEACON_BYTES` are dropped before parsing, a
bad tag is rejected in constant time, timestamps outside ±:data:`MAX_SKEW_S`
and nonces already seen within that window (replays) are refused, and each
drop is counted (see :meth:`BeaconVerifier.statistics`) and logged at debug
level at most once a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "BEACON_PORT",
    "MAX_BEACON_BYTES",
    "MAX_SKEW_S",
    "Beacon",
    "BeaconListener",
    "BeaconStats",
    "BeaconVerifier",
    "broadcast_addresses",
    "encode_beacon",
    "host_urls",
    "listen_for_beacon",
    "run_beacon",
]

log = logging.getLogger("herder.discovery")

BEACON_PORT = 7421
"""The UDP port beacons are sent to (DESIGN.md, Ports)."""

BEACON_VERSION = 1
"""Version of the beacon body; a listener drops versions it does not know."""

MAX_BEACON_BYTES = 1024
"""Larger datagrams are dropped unread: a real beacon is a few hundred bytes."""

MAX_SKEW_S = 30.0
"""Beacons stamped further than this from the listener's clock are refused."""

_KEY_LABEL = b"herder-beacon"
_TAG_BYTES = 32
_NONCE_BYTES = 16
_MAX_NONCES = 4096  # bounded replay memory: at one beacon a second, far above the window


def beacon_key(secret: bytes) -> bytes:
    """The beacon signing key, derived with a label so it differs from every other use."""
    return hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()


@dataclass(frozen=True)
class Beacon:
    """One verified beacon: who sent it, where to reach them, which CA to pin."""

    cluster: str
    urls: tuple[str, ...]
    fingerprint: bytes
    ts: float
    source: str = ""  # IP address the datagram came from

    def best_url(self) -> str:
        """The URL on the address the beacon came from (it is reachable), else the first."""
        for url in self.urls:
            if self.source and f"//{self.source}:" in url:
                return url
        return self.urls[0]


def encode_beacon(
    secret: bytes,
    cluster: str,
    urls: Sequence[str],
    fingerprint: bytes,
    *,
    ts: float | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The datagram: compact JSON body followed by a 32-byte HMAC-SHA256 tag."""
    body = json.dumps(
        {
            "v": BEACON_VERSION,
            "cluster": cluster,
            "urls": list(urls),
            "fingerprint": fingerprint.hex(),
            "ts": time.time() if ts is None else ts,
            "nonce": (nonce or secrets.token_bytes(_NONCE_BYTES)).hex(),
        },
        separators=(",", ":"),
    ).encode()
    return body + hmac.new(beacon_key(secret), body, hashlib.sha256).digest()


@dataclass(frozen=True)
class BeaconStats:
    """Counters of a verifier: what was accepted and why the rest was dropped."""

    accepted: int
    dropped: dict[str, int]


@dataclass
class BeaconVerifier:
    """Decides whether a datagram is a good beacon; pure apart from the clock it is given.

    ``cluster``: accept only this cluster id (None: any correctly signed beacon).
    """

    secret: bytes
    cluster: str | None = None
    accepted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    _key: bytes = b""
    _seen: OrderedDict[bytes, float] = field(default_factory=OrderedDict)
    _last_log: float = 0.0

    def __post_init__(self) -> None:
        self._key = beacon_key(self.secret)

    def statistics(self) -> BeaconStats:
        return BeaconStats(accepted=self.accepted, dropped=dict(self.dropped))

    def check(self, data: bytes, source: str = "", now: float | None = None) -> Beacon | None:
        """The beacon in ``data``, or None (counted by reason) if it is not a good one."""
        now = time.time() if now is None else now
        reason, beacon = self._check(data, source, now)
        if beacon is not None:
            self.accepted += 1
            return beacon
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if log.isEnabledFor(logging.DEBUG) and time.monotonic() - self._last_log >= 1.0:
            self._last_log = time.monotonic()
            log.debug("dropped beacon from %s: %s (drops so far: %s)", source, reason, self.dropped)
        return None

    def _check(self, data: bytes, source: str, now: float) -> tuple[str, Beacon | None]:
        if len(data) > MAX_BEACON_BYTES:
            return "too large", None
        if len(data) <= _TAG_BYTES:
            return "too short", None
        body, tag = data[:-_TAG_BYTES], data[-_TAG_BYTES:]
        expected = hmac.new(self._key, body, hashlib.sha256).digest()
        if not hmac.compare_digest(tag, expected):
            return "bad signature", None
        # Signed by a holder of the secret from here on, but still parsed defensively.
        try:
            raw = json.loads(body)
            if not isinstance(raw, dict) or raw.get("v") != BEACON_VERSION:
                return "unknown version", None
            cluster, urls, ts = raw["cluster"], raw["urls"], float(raw["ts"])
            fingerprint = bytes.fromhex(raw["fingerprint"])
            nonce = bytes.fromhex(raw["nonce"])
        except (ValueError, KeyError, TypeError):
            return "malformed", None
        if not isinstance(cluster, str) or not isinstance(urls, list) or not urls:
            return "malformed", None
        if not all(isinstance(u, str) and u.startswith("https://") for u in urls):
            return "malformed", None
        if abs(now - ts) > MAX_SKEW_S:
            return "stale", None
        if self.cluster is not None and cluster != self.cluster:
            return "other cluster", None
        self._forget_before(now - 2 * MAX_SKEW_S)
        if nonce in self._seen:
            return "replayed", None
        self._seen[nonce] = now
        if len(self._seen) > _MAX_NONCES:
            self._seen.popitem(last=False)
        return "", Beacon(cluster, tuple(urls), fingerprint, ts, source)

    def _forget_before(self, cutoff: float) -> None:
        while self._seen:
            nonce, at = next(iter(self._seen.items()))
            if at >= cutoff:
                return
            del self._seen[nonce]


class BeaconListener(asyncio.DatagramProtocol):
    """Receives datagrams, keeps the latest good beacon, wakes whoever waits for one."""

    def __init__(self, verifier: BeaconVerifier) -> None:
        self.verifier = verifier
        self.latest: Beacon | None = None
        self._arrived = asyncio.Event()

    def datagram_received(self, data: bytes, addr: tuple[str | object, int]) -> None:
        beacon = self.verifier.check(data, str(addr[0]))
        if beacon is not None:
            self.latest = beacon
            self._arrived.set()

    async def wait_beacon(self) -> Beacon:
        """The next good beacon (the latest one if it arrived since the last call)."""
        await self._arrived.wait()
        self._arrived.clear()
        assert self.latest is not None
        return self.latest


async def listen_for_beacon(
    secret: bytes, *, cluster: str | None = None, port: int = BEACON_PORT
) -> Beacon:
    """Listen on ``port`` until a good beacon arrives; return it and close the socket.

    The socket lives only while waiting, so an agent that is paired holds no
    open port, and several agents on one host can listen at once (SO_REUSEPORT
    delivers broadcasts to each of them).
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("0.0.0.0", port))
    transport, listener = await loop.create_datagram_endpoint(
        lambda: BeaconListener(BeaconVerifier(secret, cluster)), sock=sock
    )
    try:
        return await listener.wait_beacon()
    finally:
        transport.close()


def broadcast_addresses() -> list[str]:
    """255.255.255.255 and the broadcast address of every IPv4 interface that has one."""
    import psutil  # only a beacon needs the interfaces (1 MB of every coordinator)

    found = ["255.255.255.255"]
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and addr.broadcast and addr.broadcast not in found:
                found.append(addr.broadcast)
    return found


def host_urls(port: int, listen_host: str = "0.0.0.0") -> list[str]:
    """The URLs this host's coordinator is reached at: one per non-loopback IPv4 address.

    A coordinator bound to one address is only reachable there; bound to all,
    it is reachable on every address of the host.
    """
    if listen_host not in ("0.0.0.0", ""):
        return [f"https://{listen_host}:{port}"]
    import psutil

    urls = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family == socket.AF_INET and not ipaddress.ip_address(addr.address).is_loopback:
                urls.append(f"https://{addr.address}:{port}")
    return urls


async def run_beacon(
    secret: bytes,
    cluster: str,
    fingerprint: bytes,
    urls: Callable[[], list[str]],
    *,
    port: int = BEACON_PORT,
    every_s: float = 1.0,
) -> None:
    """Broadcast a fresh beacon every ``every_s`` until cancelled.

    ``urls`` is asked each time, so a host whose address changes announces
    the new one and agents follow. Sending errors (an interface going down,
    no route) are logged and the loop goes on: the beacon is best effort.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setblocking(False)
    failing: set[str] = set()
    try:
        while True:
            current = urls()
            if current:
                packet = encode_beacon(secret, cluster, current, fingerprint)
                for target in broadcast_addresses():
                    try:
                        sock.sendto(packet, (target, port))
                        failing.discard(target)
                    except OSError as exc:
                        if target not in failing:  # once per outage, not once a second
                            failing.add(target)
                            log.info("cannot send a beacon to %s: %s", target, exc)
            await asyncio.sleep(every_s)
    finally:
        sock.close()
