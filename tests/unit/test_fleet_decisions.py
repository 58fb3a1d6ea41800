"""The fleet's pure decisions: how many nodes to add, how many autoscaling needs."""

from __future__ import annotations

from herder.fleet import SpawnBackoff, autoscale_need, nodes_to_add


def test_nodes_to_add_fills_up_to_the_desired_count() -> None:
    assert nodes_to_add(desired=4, staying=1, alive=1, max_nodes=10, capacity=None) == 3
    assert nodes_to_add(desired=4, staying=4, alive=4, max_nodes=10, capacity=None) == 0
    assert nodes_to_add(desired=2, staying=4, alive=4, max_nodes=10, capacity=None) == 0


def test_never_more_than_max_nodes_plus_one_alive() -> None:
    # 4 staying + 1 draining of max 4: one replacement may boot, no more
    assert nodes_to_add(desired=4, staying=3, alive=4, max_nodes=4, capacity=None) == 1
    assert nodes_to_add(desired=4, staying=3, alive=5, max_nodes=4, capacity=None) == 0
    assert nodes_to_add(desired=4, staying=2, alive=4, max_nodes=4, capacity=None) == 1


def test_a_provider_is_never_asked_for_more_than_it_holds() -> None:
    assert nodes_to_add(desired=8, staying=0, alive=0, max_nodes=10, capacity=3) == 3
    assert nodes_to_add(desired=8, staying=2, alive=3, max_nodes=10, capacity=3) == 0


def test_autoscale_needs_nodes_for_ready_tasks_less_what_booting_nodes_take() -> None:
    assert autoscale_need(ready=0, unpaired_slots=0, slots=1) == 0
    assert autoscale_need(ready=3, unpaired_slots=0, slots=1) == 3
    assert autoscale_need(ready=5, unpaired_slots=0, slots=2) == 3  # ceil(5 / 2)
    assert autoscale_need(ready=3, unpaired_slots=1, slots=1) == 2
    assert autoscale_need(ready=4, unpaired_slots=2, slots=2) == 1
    assert autoscale_need(ready=1, unpaired_slots=4, slots=2) == 0


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
