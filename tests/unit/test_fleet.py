"""The fleet's decision of how many nodes to start: fixed count, or on demand up to a ceiling."""

from __future__ import annotations

from typing import Any

from herder.fleet import SpawnBackoff, spawn_count


def count(**kw: Any) -> int:
    base: dict[str, Any] = {
        "desired": 4,
        "slots": 1,
        "on_demand": True,
        "first_pass": False,
        "own": [],
        "paired": [],
        "leaving": [],
        "ready": 0,
    }
    return spawn_count(**{**base, **kw})


def test_fixed_keeps_the_count_whatever_the_queue() -> None:
    assert count(on_demand=False, own=["a"], ready=0) == 3
    assert count(on_demand=False, own=["a", "b", "c", "d"], ready=100) == 0


def test_on_demand_starts_the_ceiling_first_then_nothing_without_work() -> None:
    assert count(first_pass=True) == 4
    assert count() == 0
    assert count(own=["a"], paired=["a"], ready=0) == 0


def test_on_demand_starts_what_the_ready_tasks_need_up_to_the_ceiling() -> None:
    assert count(ready=1) == 1
    assert count(ready=3) == 3
    assert count(ready=100) == 4
    assert count(ready=100, own=["a", "b"], paired=["a", "b"]) == 2
    assert count(ready=5, slots=2) == 3  # ceil(5 / 2)


def test_booting_nodes_count_for_the_work_they_will_take() -> None:
    assert count(ready=1, own=["a"], paired=[]) == 0
    assert count(ready=3, own=["a"], paired=[]) == 2
    assert count(ready=4, slots=2, own=["a"], paired=[]) == 1


def test_leaving_nodes_make_room_and_take_nothing() -> None:
    own = ["a", "b", "c", "d"]
    assert count(ready=10, own=own, paired=own, leaving=["c", "d"]) == 2
    assert count(ready=0, own=own, paired=own, leaving=own) == 0


def test_spawn_backoff_doubles_up_to_a_cap_and_resets_when_a_node_pairs() -> None:
    backoff = SpawnBackoff(first_s=1.0, cap_s=8.0)
    assert backoff.allows(0.0)
    delays = [backoff.failed(100.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert not backoff.allows(107.9)
    assert backoff.allows(108.0)
    backoff.succeeded()
    assert backoff.allows(100.0)
    assert backoff.failed(0.0) == 1.0
