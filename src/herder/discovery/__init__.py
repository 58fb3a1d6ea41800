"""Finding a coordinator without an address: UDP beacons on a subnet, a tracker across.

Both ways end in the same place: a URL and a CA fingerprint that, with the
cluster secret the agent already holds, make a join token. Neither is trusted
on its own: beacons and tracker calls are authenticated with the secret, and
the pairing handshake proves it again both ways.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .beacon import listen_for_beacon
from .tracker import Entry, TrackerError

if TYPE_CHECKING:
    from .tracker_client import TrackerClient

__all__ = ["DiscoveryOptions", "Found", "find_coordinator"]

log = logging.getLogger("herder.discovery")


@dataclass(frozen=True)
class DiscoveryOptions:
    """How a coordinator makes itself findable (``herder up`` options)."""

    beacon: bool = True
    beacon_port: int = 7421
    tracker_url: str | None = None  # announce to this tracker every few seconds
    serve_tracker: bool = False  # also serve the tracker routes on the coordinator's port


@dataclass(frozen=True)
class Found:
    """A coordinator found by discovery: enough, with the secret, for a join token."""

    url: str
    fingerprint: bytes
    cluster: str | None
    via: str  # "beacon" or "tracker"


async def find_coordinator(
    secret: bytes,
    *,
    beacon: bool = True,
    beacon_port: int = 7421,
    tracker: TrackerClient | None = None,
    cluster: str | None = None,
    poll_s: float = 1.0,
) -> Found:
    """Wait until a coordinator is found by beacon or through the tracker, whichever is first.

    Waits for as long as it takes (the caller bounds it): a coordinator
    started after the agent is found when its first beacon or announcement
    arrives.
    """
    if not beacon and tracker is None:
        raise ValueError("find_coordinator needs the beacon, a tracker, or both")
    async with asyncio.TaskGroup() as tg:
        ways: list[asyncio.Task[Found]] = []
        if beacon:
            ways.append(tg.create_task(_by_beacon(secret, beacon_port, cluster), name="beacon"))
        if tracker is not None:
            ways.append(tg.create_task(_by_tracker(tracker, cluster, poll_s), name="tracker"))
        done, pending = await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
        for way in pending:
            way.cancel()
    return next(iter(done)).result()


async def _by_beacon(secret: bytes, port: int, cluster: str | None) -> Found:
    got = await listen_for_beacon(secret, cluster=cluster, port=port)
    return Found(got.best_url(), got.fingerprint, got.cluster, "beacon")


async def _by_tracker(tracker: TrackerClient, cluster: str | None, poll_s: float) -> Found:
    failing = False
    while True:
        try:
            entry = await tracker.find_coordinator(cluster)
            failing = False
        except TrackerError as exc:
            if not failing:
                log.warning("%s", exc)
            failing = True
            entry = None
        if entry is not None and entry.fingerprint is not None:
            try:
                fingerprint = bytes.fromhex(entry.fingerprint)
            except ValueError:
                log.warning("tracker entry %s has a malformed fingerprint", entry.id)
            else:
                return Found(_best_url(entry), fingerprint, entry.cluster, "tracker")
        await asyncio.sleep(poll_s)


def _best_url(entry: Entry) -> str:
    """Prefer the URL on the address the coordinator announced from (the tracker saw it)."""
    for url in entry.urls:
        if entry.address and f"//{entry.address}:" in url:
            return url
    return entry.urls[0]
