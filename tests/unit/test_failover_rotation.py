"""The agent's choice of the next coordinator to try (herder.agent.failover)."""

from __future__ import annotations

import pytest

from herder.agent.failover import Rotation

A, B, C = "https://a:7420", "https://b:7420", "https://c:7420"


def walk(rotation: Rotation, steps: int) -> list[tuple[str | None, bool]]:
    """(target after each advance, whether that began a new round)."""
    out = []
    for _ in range(steps):
        wrapped = rotation.advance()
        out.append((rotation.target, wrapped))
    return out


def test_round_robin_backs_off_only_after_a_whole_round() -> None:
    r = Rotation([A, B, C], discover=False)
    assert r.target == A
    assert walk(r, 4) == [(B, False), (C, False), (A, True), (B, False)]


def test_a_round_starts_from_the_coordinator_last_paired_with() -> None:
    r = Rotation([A, B, C], discover=False)
    r.advance()
    r.paired()  # paired with B; B then dies
    assert walk(r, 3) == [(C, False), (A, False), (B, True)]


def test_a_single_coordinator_is_a_round_of_one() -> None:
    r = Rotation([A], discover=False)
    assert walk(r, 2) == [(A, True), (A, True)]
    assert r.choices == 1


def test_duplicates_are_tried_once() -> None:
    r = Rotation([A, B, A], discover=False)
    assert r.choices == 2
    assert walk(r, 2) == [(B, False), (A, True)]


def test_discovery_is_the_first_step_and_never_dropped() -> None:
    r = Rotation([A], discover=True)
    assert r.target is None
    assert walk(r, 2) == [(A, False), (None, True)]
    assert r.drop()  # discovery: kept
    assert r.choices == 2
    r.advance()
    assert r.drop()  # A answered as another cluster: dropped, discovery stays
    assert r.choices == 1
    assert walk(r, 2) == [(None, True), (None, True)]


def test_another_clusters_address_is_skipped_for_good() -> None:
    r = Rotation([A, B, C], discover=False)
    r.advance()
    assert r.drop()  # B answered as another cluster
    assert walk(r, 4) == [(C, False), (A, True), (C, False), (A, True)]
    assert r.drop()  # so did A
    assert walk(r, 2) == [(C, False), (C, True)]
    assert not r.drop()  # nothing left: the agent gives up
    assert r.choices == 0


def test_nothing_to_try_is_refused() -> None:
    with pytest.raises(ValueError, match="no coordinator to try"):
        Rotation([], discover=False)
