"""A result too big to travel inline goes to the datastore from the node: the store
and the coordinator keep only a small reference, the client and dependent tasks get
the value itself."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from herder.client import Client
from herder.local import LocalHerd
from herder.values import INLINE_RESULT_BYTES


def make(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def length(data: bytes) -> int:
    return len(data)


@pytest.fixture(scope="module")
def herd() -> Iterator[tuple[LocalHerd, Client]]:
    h = LocalHerd(nodes=1, slots=2)
    client = h.start()
    try:
        h.wait_nodes(1)
        yield h, client
    finally:
        h.stop()


def stored_result_size(h: LocalHerd, task_id: str) -> int:
    db = sqlite3.connect(h.home / "herd.db")
    try:
        (size,) = db.execute("SELECT length(result) FROM tasks WHERE id = ?", (task_id,)).fetchone()
    finally:
        db.close()
    return int(size)


def test_a_big_result_goes_by_the_datastore(herd: tuple[LocalHerd, Client]) -> None:
    h, client = herd
    size = 3 * INLINE_RESULT_BYTES
    big = client.submit(make, size)
    assert big.result(timeout=60) == make(size)
    assert stored_result_size(h, big.task_id) < 4096  # a reference, not the value
    [kept] = [o for o in client.data.ls("results/") if o.key.startswith(f"results/{big.task_id}/")]
    assert kept.size > size
    # a dependent task gets the value itself
    assert client.submit(length, big).result(timeout=60) == size


def test_small_results_still_travel_inline(herd: tuple[LocalHerd, Client]) -> None:
    h, client = herd
    small = client.submit(make, 1000)
    assert small.result(timeout=30) == make(1000)
    assert stored_result_size(h, small.task_id) > 1000
    assert not [o for o in client.data.ls("results/") if small.task_id in o.key]
