"""Beacon verification and the tracker's registry and signatures, without a network."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from herder.discovery.beacon import MAX_BEACON_BYTES, BeaconVerifier, encode_beacon
from herder.discovery.tracker import Entry, Registry, TrackerError, tracker_app
from herder.discovery.tracker_client import TrackerClient

SECRET = bytes(range(32))
FP = bytes(32)
URLS = ["https://10.0.0.1:7420"]


def test_a_good_beacon_is_accepted_once() -> None:
    verifier = BeaconVerifier(SECRET)
    packet = encode_beacon(SECRET, "c-1", URLS, FP)
    got = verifier.check(packet, "10.0.0.1")
    assert got is not None
    assert got.best_url() == URLS[0]
    assert verifier.check(packet, "10.0.0.1") is None  # the same nonce again: a replay
    assert verifier.statistics().dropped == {"replayed": 1}


def _stamped(skew: float) -> bytes:
    return encode_beacon(SECRET, "c-1", URLS, FP, ts=time.time() + skew)


# Factories, not packets: a beacon made at collection time may be stale when the test runs.
@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: encode_beacon(secrets.token_bytes(32), "c-1", URLS, FP), "bad signature"),
        (lambda: _stamped(-31), "stale"),
        (lambda: _stamped(+31), "stale"),
        (lambda: encode_beacon(SECRET, "c-2", URLS, FP), "other cluster"),
        (lambda: encode_beacon(SECRET, "c-1", ["http://x:1"], FP), "malformed"),
        (lambda: b"x" * (MAX_BEACON_BYTES + 1), "too large"),
        (lambda: b"", "too short"),
    ],
)
def test_bad_beacons_are_dropped_with_a_reason(make: Callable[[], bytes], reason: str) -> None:
    verifier = BeaconVerifier(SECRET, cluster="c-1")
    assert verifier.check(make()) is None
    assert verifier.statistics().dropped == {reason: 1}


@given(st.binary(max_size=2 * MAX_BEACON_BYTES))
def test_garbage_never_raises(data: bytes) -> None:
    assert BeaconVerifier(SECRET).check(data) is None


def test_registry_entries_expire_after_the_ttl() -> None:
    now = [0.0]
    registry = Registry(ttl_s=10, clock=lambda: now[0])
    registry.announce(Entry(kind="agent", id="n-1"))
    now[0] = 9.9
    assert [e.id for e in registry.hosts()] == ["n-1"]
    now[0] = 10.0
    assert registry.hosts() == []


async def test_tracker_calls_are_signed_both_ways() -> None:
    app = tracker_app(SECRET)
    client = TrackerClient("http://tracker", SECRET, transport=httpx.ASGITransport(app))
    async with client:
        await client.announce(
            Entry(kind="coordinator", id="c-1", urls=URLS, fingerprint=FP.hex(), cluster="c-1")
        )
        found = await client.find_coordinator("c-1")
        assert found is not None
        assert found.urls == URLS
        assert await client.find_coordinator("c-2") is None
    stranger = TrackerClient(
        "http://tracker", secrets.token_bytes(32), transport=httpx.ASGITransport(app)
    )
    async with stranger:
        with pytest.raises(TrackerError, match="401"):
            await stranger.hosts()
