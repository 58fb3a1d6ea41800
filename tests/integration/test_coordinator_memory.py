"""The coordinator holds no submission once it is committed (issue 11, workload E).

The queue lives in the store, not in the coordinator's memory. What once kept
a batch alive was the frame loop and the engine loop: each held its last
message and submissions in a local variable while it waited for the next
(the coordinator grew 61 MB for the batch below). Then the watch on each task
stayed until the task finished, though its future was dropped, and pinned
allocator arenas (35 MB); since the client releases dropped futures, 17 MB
remain: the frame the WebSocket parser keeps until the next one arrives, and
arenas.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from herder.client import Client
from herder.local import LocalHerd
from herder.model import TaskSpec, new_id

TASKS = 20_000  # one frame of ~4 MB, some 25 MB once decoded into TaskSpecs
SLACK_MB = 28.0  # between 17 MB (now, run after run) and 35 MB (watches kept)


@pytest.fixture
def idle_herd(tmp_path: Path) -> Iterator[tuple[LocalHerd, Client]]:
    herd = LocalHerd(nodes=0, home=tmp_path / "home")
    try:
        yield herd, herd.start()
    finally:
        herd.stop()


def _batch(count: int) -> list[TaskSpec]:
    return [
        TaskSpec(id=new_id("t"), kind="call", name="noop", payload=b"p" * 64 + i.to_bytes(4))
        for i in range(count)
    ]


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def test_a_committed_batch_is_not_kept(idle_herd: tuple[LocalHerd, Client]) -> None:
    herd, client = idle_herd
    assert herd.process is not None
    job = new_id("j")
    # warm up every path a submission takes (one small batch), then measure
    client._run(client.aio.submit_batch(job, "warm", _batch(2)))
    time.sleep(0.5)
    before = _rss_mb(herd.process.pid)
    client._run(client.aio.submit_batch(job, "many", _batch(TASKS)))
    time.sleep(1.0)  # the engine's turn is over; both loops wait for what comes next
    after = _rss_mb(herd.process.pid)
    assert client.job(job)["total"] == TASKS + 2
    assert after - before < SLACK_MB, (
        f"the coordinator grew {after - before:.1f} MB after a batch of {TASKS} tasks "
        "was committed: something still holds it"
    )


def _watched(herd: LocalHerd, client: Client) -> float:
    """The coordinator's ``herder_watched_tasks`` gauge (refreshed at most every 2 s)."""
    headers = {"authorization": client.aio.http.headers["authorization"]}
    text = httpx.get(f"{herd.url}/metrics", headers=headers, verify=False).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "herder_watched_tasks":
                return sample.value
    raise AssertionError("no herder_watched_tasks in /metrics")


def test_a_closed_session_leaves_no_watches(idle_herd: tuple[LocalHerd, Client]) -> None:
    """The watches are kept only in the coordinator's one map (no copy per session):
    a session that goes takes its watches with it, another's stay."""
    herd, client = idle_herd
    stays = client._run(client.aio.submit_batch(new_id("j"), "stays", _batch(30)))
    other = Client(env=herd.env())
    goes = other._run(other.aio.submit_batch(new_id("j"), "goes", _batch(500)))
    assert _watched(herd, client) == 530
    other.close()
    time.sleep(2.1)  # the gauge is cached for 2 s
    assert _watched(herd, client) == 30
    # held until here, and so watched until here
    assert len(stays) == 30
    assert len(goes) == 500


def test_dropped_futures_are_no_longer_watched(idle_herd: tuple[LocalHerd, Client]) -> None:
    """A future the program drops (here in the caller's thread, not the client's loop)
    is released: the coordinator stops watching its task; a kept one stays watched."""
    herd, client = idle_herd
    futures = client._run(client.aio.submit_batch(new_id("j"), "some kept", _batch(400)))
    assert _watched(herd, client) == 400
    kept = futures[::4]
    del futures
    deadline = time.monotonic() + 10
    while (watched := _watched(herd, client)) != 100 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert watched == 100
    assert len(kept) == 100
