"""The SQL store on real SQLite and PostgreSQL databases: no mocks, no fakes.

Every test runs on both backends (fixture ``store_url``). Tests assert on the
states, the attempts rows and the returned :class:`Changes`, and a rejected
operation is checked to leave every table exactly as it was.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herder.errors import InvalidTransition, SubmissionError
from herder.model import NodeRecord, NodeState, TaskSpec, TaskState
from herder.store.base import Changes, Claimed, ClaimRequest, Sample, Submission, TaskResult
from herder.store.prepared import driver_of
from herder.store.sql import SqlStore

S = TaskState
TABLES = ("tasks", "deps", "jobs", "attempts", "nodes", "events")


# --- helpers ---------------------------------------------------------------------


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def spec(
    tid: str,
    deps: Sequence[str] = (),
    *,
    priority: int = 0,
    max_attempts: int = 3,
    labels: dict[str, str] | None = None,
    rof: bool = False,
) -> TaskSpec:
    return TaskSpec(
        id=tid,
        name=tid,
        kind="call",
        payload=b"payload " + tid.encode(),
        depends_on=list(deps),
        priority=priority,
        max_attempts=max_attempts,
        labels=labels or {},
        run_on_failure=rof,
    )


def ok(c: Claimed, result: bytes | None = None) -> TaskResult:
    return TaskResult(c.task_id, c.lease_id, S.SUCCEEDED, result=result or c.task_id.encode())


def fail(c: Claimed, reason: str = "error") -> TaskResult:
    return TaskResult(c.task_id, c.lease_id, S.FAILED, reason=reason, error={"type": "Boom"})


async def rows(store: SqlStore, text: str, **params: Any) -> list[tuple[Any, ...]]:
    """Read the tables directly: the checker's view, not the API's."""

    def run(conn: sa.Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sa.text(text), params)]

    return await store._read(run)


async def snapshot(store: SqlStore) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to prove that an operation changed nothing."""
    out = {}
    for table in TABLES:
        got = await rows(store, f"SELECT * FROM {table}")
        out[table] = sorted(got, key=repr)
    return out


async def state(store: SqlStore, tid: str) -> TaskState:
    rec = await store.task(tid)
    assert rec is not None, tid
    return rec.state


async def attempt_rows(store: SqlStore, tid: str) -> list[tuple[Any, ...]]:
    """(attempt, lease_id, node_id, outcome, reason) of the ended attempts of ``tid``."""
    return await rows(
        store,
        "SELECT attempt, lease_id, node_id, outcome, reason FROM attempts "
        "WHERE task_id = :t ORDER BY attempt, leased_at",
        t=tid,
    )


def finals_of(changes: Changes) -> set[tuple[str, TaskState, str | None]]:
    return {(f.task_id, f.state, f.reason) for f in changes.finals}


async def claim_all(
    store: SqlStore, node: str, now: float, keys: Sequence[str] = ("",)
) -> dict[str, Claimed]:
    got = await store.claim(node, list(keys), 100, now)
    return {c.task_id: c for c in got}


# --- claims ------------------------------------------------------------------------


async def test_claim_takes_highest_priority_first_then_oldest(store: SqlStore) -> None:
    await store.submit("j1", None, [spec("a"), spec("b", priority=5)], now=1.0)
    await store.submit("j2", None, [spec("c"), spec("d", priority=5), spec("e", priority=-1)], 2.0)

    got = await store.claim("n1", [""], 3, now=3.0)
    assert [c.task_id for c in got] == ["b", "d", "a"]
    assert all(c.attempt == 1 and c.lease_id for c in got)
    assert len({c.lease_id for c in got}) == 3
    assert got[0].payload == b"payload b"
    assert got[0].kind == "call"
    assert got[0].dep_results == {}
    rec = await store.task("b")
    assert rec is not None
    assert (rec.state, rec.lease_id, rec.node_id, rec.attempt) == (
        S.LEASED,
        got[0].lease_id,
        "n1",
        1,
    )

    rest = await store.claim("n2", [""], 10, now=4.0)
    assert [c.task_id for c in rest] == ["c", "e"]
    assert await store.claim("n3", [""], 10, now=5.0) == []
    assert await store.counts() == {"leased": 5}
    assert await store.leases_of("n2") == sorted((c.task_id, c.lease_id) for c in rest)


async def test_claims_honour_labels(store: SqlStore) -> None:
    await store.submit(
        "j",
        None,
        [
            spec("plain"),
            spec("gpu", labels={"gpu": "1"}),
            spec("other", labels={"gpu": "2"}),
        ],
        1.0,
    )
    assert sorted(await store.ready_constraint_keys()) == ["", "gpu=1", "gpu=2"]
    assert await store.claim("n1", [], 10, 2.0) == []
    assert [c.task_id for c in await store.claim("cpu", [""], 10, 2.0)] == ["plain"]
    assert await store.claim("cpu", [""], 10, 2.0) == []
    assert [c.task_id for c in await store.claim("g", ["", "gpu=1"], 10, 3.0)] == ["gpu"]
    assert await store.ready_constraint_keys() == ["gpu=2"]
    assert await state(store, "other") == S.READY


async def test_claim_over_several_keys_keeps_global_order(store: SqlStore) -> None:
    gpu = {"gpu": "1"}
    await store.submit(
        "j",
        None,
        [
            spec("g-low", labels=gpu),
            spec("p-high", priority=3),
            spec("g-mid", priority=2, labels=gpu),
            spec("p-mid", priority=2),
            spec("g-old", priority=2, labels=gpu),
        ],
        1.0,
    )
    got = await store.claim("n", ["gpu=1", ""], 3, 2.0)
    assert [c.task_id for c in got] == ["p-high", "g-mid", "p-mid"]
    got = await store.claim("n", ["gpu=1", "", "ssd=1"], 5, 3.0)
    assert [c.task_id for c in got] == ["g-old", "g-low"]


async def test_two_claim_requests_of_one_node_in_one_cycle_are_both_returned(
    store: SqlStore,
) -> None:
    await store.submit("j", None, [spec("a"), spec("b", labels={"gpu": "1"})], 1.0)
    _, claimed, _ = await store.cycle(
        claims=[ClaimRequest("n1", [""], 5), ClaimRequest("n1", ["gpu=1"], 5)], now=2.0
    )
    assert sorted(c.task_id for c in claimed["n1"]) == ["a", "b"]
    assert sorted(t for t, _ in await store.leases_of("n1")) == ["a", "b"]


# --- results -----------------------------------------------------------------------


async def test_complete_with_the_current_lease_stores_the_result(store: SqlStore) -> None:
    await store.submit("j", "job", [spec("a")], 1.0)
    [c] = await store.claim("n1", [""], 1, 2.0)
    ch = await store.complete([ok(c, b"42")], 3.0)
    assert ch.accepted == [c.lease_id]
    assert ch.refused == []
    assert finals_of(ch) == {("a", S.SUCCEEDED, None)}
    assert ch.finals[0].result == b"42"
    rec = await store.task("a")
    assert rec is not None
    assert (rec.state, rec.finished_at) == (S.SUCCEEDED, 3.0)
    [f] = await store.finals(["a", "unknown"])
    assert (f.task_id, f.state, f.result) == ("a", S.SUCCEEDED, b"42")
    assert await attempt_rows(store, "a") == [(1, c.lease_id, "n1", "succeeded", None)]
    assert await store.finished_since(3.0) == 1
    assert await store.finished_since(3.5) == 0
    assert await store.leases_of("n1") == []


async def test_a_stale_or_unknown_lease_is_refused_and_changes_nothing(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b")], 1.0)
    first = await claim_all(store, "n1", 2.0)
    # a lease handed back and given again: the first lease id is stale
    await store.release_leases([("a", first["a"].lease_id)], 3.0)
    [again] = await store.claim("n2", [""], 1, 4.0)
    assert again.task_id == "a"
    assert again.lease_id != first["a"].lease_id

    before = await snapshot(store)
    ch = await store.complete(
        [
            ok(first["a"]),
            TaskResult("b", "not-a-lease", S.SUCCEEDED, result=b"x"),
            TaskResult("ghost", "nope", S.FAILED),
        ],
        5.0,
    )
    assert ch.accepted == []
    assert ch.finals == []
    assert ch.requeued == []
    assert sorted(ch.refused) == sorted([first["a"].lease_id, "not-a-lease", "nope"])
    assert await snapshot(store) == before
    rec = await store.task("a")
    assert rec is not None
    assert (rec.state, rec.lease_id) == (S.LEASED, again.lease_id)


async def test_the_same_result_twice_is_acknowledged_and_recorded_once(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b"), spec("r", max_attempts=2)], 1.0)
    got = await claim_all(store, "n1", 2.0)

    ch1 = await store.complete([ok(got["a"], b"1")], 3.0)
    ch2 = await store.complete([ok(got["a"], b"1")], 4.0)
    assert ch1.accepted == ch2.accepted == [got["a"].lease_id]
    assert ch2.refused == []
    assert ch2.finals == []
    # twice in one batch
    ch3 = await store.complete([ok(got["b"]), ok(got["b"])], 5.0)
    assert ch3.accepted == [got["b"].lease_id] * 2
    assert ch3.refused == []
    assert len(ch3.finals) == 1
    # a failed attempt that was retried, resent after its lease went back
    ch4 = await store.complete([fail(got["r"])], 6.0)
    assert ch4.requeued == ["r"]
    before = await snapshot(store)
    ch5 = await store.complete([fail(got["r"])], 7.0)
    assert ch5.accepted == [got["r"].lease_id]
    assert ch5.refused == []
    assert ch5.requeued == []
    assert await snapshot(store) == before

    for tid in ("a", "b"):
        assert await rows(store, "SELECT outcome FROM attempts WHERE task_id = :t", t=tid) == [
            ("succeeded",)
        ]
    assert await attempt_rows(store, "r") == [(1, got["r"].lease_id, "n1", "failed", "error")]
    [f] = await store.finals(["a"])
    assert f.result == b"1"


async def test_a_failed_attempt_is_retried_until_max_attempts(store: SqlStore) -> None:
    await store.submit("j", None, [spec("r", max_attempts=2)], 1.0)
    [c1] = await store.claim("n1", [""], 1, 2.0)
    assert c1.attempt == 1
    ch = await store.complete([fail(c1, "error")], 3.0)
    assert ch.accepted == [c1.lease_id]
    assert ch.requeued == ["r"]
    assert ch.finals == []
    assert ch.newly_ready == 1
    rec = await store.task("r")
    assert rec is not None
    assert (rec.state, rec.attempt, rec.lease_id, rec.node_id) == (S.READY, 1, None, None)

    [c2] = await store.claim("n2", [""], 1, 4.0)
    assert (c2.task_id, c2.attempt) == ("r", 2)
    assert c2.lease_id != c1.lease_id
    ch = await store.complete([fail(c2, "timeout")], 5.0)
    assert finals_of(ch) == {("r", S.FAILED, "timeout")}
    assert ch.requeued == []
    rec = await store.task("r")
    assert rec is not None
    assert (rec.state, rec.attempt, rec.reason) == (S.FAILED, 2, "timeout")
    assert await attempt_rows(store, "r") == [
        (1, c1.lease_id, "n1", "failed", "error"),
        (2, c2.lease_id, "n2", "failed", "timeout"),
    ]
    assert await store.claim("n1", [""], 1, 6.0) == []


async def test_an_overlong_reason_is_clipped_not_fatal(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a", max_attempts=1)], 1.0)
    [c] = await store.claim("n1", [""], 1, 2.0)
    ch = await store.complete([fail(c, "x" * 5000)], 3.0)
    assert ch.accepted == [c.lease_id]
    rec = await store.task("a")
    assert rec is not None
    assert rec.state == S.FAILED
    assert rec.reason is not None
    assert 0 < len(rec.reason) <= 256


# --- lost nodes, handed-back leases, adoption --------------------------------------


async def test_requeue_node_charges_the_attempt_and_spares_kept_leases(store: SqlStore) -> None:
    await store.submit(
        "j",
        None,
        [
            spec("elsewhere"),
            spec("a"),
            spec("b"),
            spec("k"),
            spec("s", max_attempts=1),
            spec("sd", ["s"]),
            spec("sdd", ["sd"]),
        ],
        1.0,
    )
    on_n2 = await store.claim("n2", [""], 1, 1.5)
    got = await claim_all(store, "n1", 2.0)
    assert sorted(got) == ["a", "b", "k", "s"]
    await store.mark_running([(got["b"].task_id, got["b"].lease_id)], 3.0)

    ch = await store.requeue_node("n1", "lost heartbeat", 4.0, keep={got["k"].lease_id})
    assert sorted(ch.requeued) == ["a", "b"]
    assert ch.newly_ready == 2
    assert finals_of(ch) == {
        ("s", S.FAILED, "lost"),
        ("sd", S.FAILED, "dependency failed"),
        ("sdd", S.FAILED, "dependency failed"),
    }
    for tid in ("a", "b"):
        rec = await store.task(tid)
        assert rec is not None
        assert (rec.state, rec.attempt, rec.lease_id, rec.node_id) == (S.READY, 1, None, None)
        assert await attempt_rows(store, tid) == [
            (1, got[tid].lease_id, "n1", "lost", "lost heartbeat")
        ]
    assert await store.leases_of("n1") == [("k", got["k"].lease_id)]
    assert await store.leases_of("n2") == [(on_n2[0].task_id, on_n2[0].lease_id)]
    rec = await store.task("s")
    assert rec is not None
    assert (rec.state, rec.reason) == (S.FAILED, "lost")
    assert await attempt_rows(store, "sd") == []

    again = await claim_all(store, "n3", 5.0)
    assert sorted(again) == ["a", "b"]
    assert again["a"].attempt == 2


async def test_requeue_node_fails_a_task_that_ran_out_of_attempts(store: SqlStore) -> None:
    await store.submit("j", None, [spec("t", max_attempts=2), spec("dep", ["t"])], 1.0)
    [_c1] = await store.claim("n1", [""], 1, 2.0)
    await store.requeue_node("n1", "lost heartbeat", 3.0)
    [c2] = await store.claim("n2", [""], 1, 4.0)
    assert c2.attempt == 2
    ch = await store.requeue_node("n2", "lost heartbeat", 5.0)
    assert ch.requeued == []
    assert finals_of(ch) == {("t", S.FAILED, "lost"), ("dep", S.FAILED, "dependency failed")}
    assert [r[3] for r in await attempt_rows(store, "t")] == ["lost", "lost"]
    # the lost node's late result does not revive it
    late = await store.complete([ok(c2)], 6.0)
    assert late.finals == []
    assert await state(store, "t") == S.FAILED


async def test_release_leases_hands_back_tasks_without_charging(store: SqlStore) -> None:
    """Unstarted leases (a drain) and running ones its agent stopped (a spot
    interruption, a terminate) come back ready, their attempt not counted;
    a stale lease id releases nothing."""
    await store.submit("j", None, [spec("a"), spec("b"), spec("c")], 1.0)
    got = await claim_all(store, "n1", 2.0)
    await store.mark_running([("b", got["b"].lease_id)], 3.0)
    ch = await store.release_leases(
        [("a", got["a"].lease_id), ("b", got["b"].lease_id), ("c", "stale-lease")], 4.0
    )
    assert ch.requeued == ["a", "b"]
    assert ch.newly_ready == 2
    for tid in ("a", "b"):
        rec = await store.task(tid)
        assert rec is not None
        assert (rec.state, rec.attempt, rec.lease_id, rec.started_at) == (S.READY, 0, None, None)
    rec = await store.task("c")
    assert rec is not None
    assert (rec.state, rec.lease_id) == (S.LEASED, got["c"].lease_id)
    [c] = await store.claim("n2", [""], 1, 5.0)
    assert (c.task_id, c.attempt) == ("a", 1)
    assert c.lease_id != got["a"].lease_id
    assert [a.lease_id for a in await store.attempts("a")] == [c.lease_id]
    assert await attempt_rows(store, "a") == []


async def test_mark_running_moves_current_leases_only(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b")], 1.0)
    got = await claim_all(store, "n1", 2.0)
    await store.mark_running([("a", got["a"].lease_id), ("b", "stale-lease")], 5.0)
    a = await store.task("a")
    b = await store.task("b")
    assert a is not None
    assert (a.state, a.started_at) == (S.RUNNING, 5.0)
    assert b is not None
    assert (b.state, b.started_at) == (S.LEASED, None)
    [cur] = await store.attempts("a")
    assert (cur.lease_id, cur.started_at, cur.ended_at, cur.outcome) == (
        got["a"].lease_id,
        5.0,
        None,
        None,
    )


async def test_adopt_keeps_current_leases_and_moves_them(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b"), spec("c")], 1.0)
    got = await claim_all(store, "n1", 2.0)
    await store.mark_running([("c", got["c"].lease_id)], 2.5)
    await store.release_leases([("b", got["b"].lease_id)], 3.0)  # b's lease is now stale
    kept = await store.adopt(
        "n2",
        [
            ("a", got["a"].lease_id),
            ("b", got["b"].lease_id),
            ("c", got["c"].lease_id),
            ("ghost", "x"),
        ],
    )
    assert sorted(kept) == sorted([got["a"].lease_id, got["c"].lease_id])
    assert await store.leases_of("n1") == []
    assert sorted(await store.leases_of("n2")) == [
        ("a", got["a"].lease_id),
        ("c", got["c"].lease_id),
    ]
    b = await store.task("b")
    assert b is not None
    assert (b.state, b.node_id, b.lease_id) == (S.READY, None, None)
    assert await store.adopt("n2", []) == []


# --- dependencies --------------------------------------------------------------------


async def test_a_dependent_waits_for_all_dependencies_and_gets_their_results(
    store: SqlStore,
) -> None:
    ch = await store.submit("j", None, [spec("x"), spec("y"), spec("z", ["x", "y"])], 1.0)
    assert ch.newly_ready == 2
    assert await state(store, "z") == S.WAITING
    got = await claim_all(store, "n1", 2.0)
    assert sorted(got) == ["x", "y"]
    ch = await store.complete([ok(got["x"], b"X")], 3.0)
    assert ch.newly_ready == 0
    assert await state(store, "z") == S.WAITING
    ch = await store.complete([ok(got["y"], b"Y")], 4.0)
    assert ch.newly_ready == 1
    assert await state(store, "z") == S.READY
    [c] = await store.claim("n1", [""], 5, 5.0)
    assert c.task_id == "z"
    assert c.dep_results == {"x": b"X", "y": b"Y"}
    rec = await store.task("z")
    assert rec is not None
    assert rec.depends_on == ["x", "y"]


async def test_a_failed_dependency_fails_its_dependents_transitively(store: SqlStore) -> None:
    await store.submit(
        "j",
        None,
        [
            spec("a", max_attempts=1),
            spec("b", ["a"]),
            spec("c", ["b"]),
            spec("d", ["c"]),
            spec("u"),
            spec("v", ["u"]),
        ],
        1.0,
    )
    [c] = await store.claim("n1", [""], 1, 2.0)
    assert c.task_id == "a"
    ch = await store.complete([fail(c)], 3.0)
    assert finals_of(ch) == {
        ("a", S.FAILED, "error"),
        ("b", S.FAILED, "dependency failed"),
        ("c", S.FAILED, "dependency failed"),
        ("d", S.FAILED, "dependency failed"),
    }
    for tid in "bcd":
        rec = await store.task(tid)
        assert rec is not None
        assert (rec.state, rec.reason, rec.attempt) == (
            S.FAILED,
            "dependency failed",
            0,
        )
    assert (await state(store, "u"), await state(store, "v")) == (S.READY, S.WAITING)
    assert await store.counts() == {"failed": 4, "ready": 1, "waiting": 1}


async def test_run_on_failure_dependents_become_ready(store: SqlStore) -> None:
    await store.submit(
        "j",
        None,
        [
            spec("a", max_attempts=1),
            spec("good"),
            spec("r", ["a", "good"], rof=True),
            spec("b", ["a"]),
            spec("r2", ["b"], rof=True),
        ],
        1.0,
    )
    got = await claim_all(store, "n1", 2.0)
    ch = await store.complete([fail(got["a"])], 3.0)
    assert finals_of(ch) == {("a", S.FAILED, "error"), ("b", S.FAILED, "dependency failed")}
    assert ch.newly_ready == 1
    assert (await state(store, "r"), await state(store, "r2")) == (S.WAITING, S.READY)
    await store.complete([ok(got["good"], b"G")], 4.0)
    assert await state(store, "r") == S.READY
    again = await claim_all(store, "n1", 5.0)
    assert sorted(again) == ["r", "r2"]
    assert again["r"].dep_results == {"good": b"G"}
    assert again["r2"].dep_results == {}


async def test_depending_on_finished_tasks_of_an_earlier_batch(store: SqlStore) -> None:
    await store.submit("j1", None, [spec("p"), spec("f", max_attempts=1)], 1.0)
    got = await claim_all(store, "n1", 2.0)
    await store.complete([ok(got["p"], b"P"), fail(got["f"])], 3.0)

    ch = await store.submit("j2", None, [spec("q", ["p"])], 4.0)
    assert ch.newly_ready == 1
    assert ch.finals == []
    [c] = await store.claim("n1", [""], 5, 5.0)
    assert c.task_id == "q"
    assert c.dep_results == {"p": b"P"}

    ch = await store.submit(
        "j3", None, [spec("g", ["f"]), spec("i", ["g"]), spec("h", ["f"], rof=True)], 6.0
    )
    assert finals_of(ch) == {
        ("g", S.FAILED, "dependency failed"),
        ("i", S.FAILED, "dependency failed"),
    }
    assert ch.newly_ready == 1
    assert (await state(store, "g"), await state(store, "i"), await state(store, "h")) == (
        S.FAILED,
        S.FAILED,
        S.READY,
    )
    summary = await store.job("j3")
    assert summary is not None
    assert summary.counts == {"failed": 2, "ready": 1}


# --- submissions ---------------------------------------------------------------------


BAD_BATCHES: dict[str, tuple[list[TaskSpec], list[str]]] = {
    "cycle": (
        [spec("fine"), spec("a", ["c"]), spec("b", ["a"]), spec("c", ["b"])],
        ["cycle", "a", "b", "c"],
    ),
    "unknown-dependency": ([spec("fine"), spec("b", ["nope"])], ["nope"]),
    "duplicate-id": ([spec("fine"), spec("dup"), spec("dup")], ["dup", "twice"]),
    "partly-stored": ([spec("fine"), spec("s2")], ["already stored", "s2"]),
    "overlong-labels": ([spec("fine"), spec("big", labels={"k": "v" * 2000})], ["big", "labels"]),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
async def test_a_bad_submission_is_rejected_whole(store: SqlStore, case: str) -> None:
    await store.submit("old", None, [spec("s1"), spec("s2", ["s1"])], 1.0)
    before = await snapshot(store)
    counts, jobs = await store.counts(), await store.jobs()
    batch, words = BAD_BATCHES[case]
    with pytest.raises(SubmissionError) as info:
        await store.submit("bad", None, batch, 2.0)
    for word in words:
        assert word in str(info.value)
    assert await snapshot(store) == before
    assert (await store.counts(), await store.jobs()) == (counts, jobs)
    assert await store.job("bad") is None
    assert await store.task("fine") is None


async def test_a_resubmitted_batch_is_stored_once(store: SqlStore) -> None:
    batch = [spec("a"), spec("b", ["a"])]
    ch = await store.submit("j", "name", batch, 1.0)
    assert ch.newly_ready == 1
    [c] = await store.claim("n1", [""], 1, 2.0)
    await store.complete([ok(c)], 3.0)
    before = await snapshot(store)
    ch = await store.submit("j", "name", batch, 4.0)
    assert (ch.newly_ready, ch.finals) == (0, [])
    assert await snapshot(store) == before
    summary = await store.job("j")
    assert summary is not None
    assert summary.counts == {"succeeded": 1, "ready": 1}


async def test_one_bad_batch_in_a_cycle_does_not_stop_the_others(store: SqlStore) -> None:
    await store.submit("j0", None, [spec("running")], 1.0)
    [r] = await store.claim("n0", [""], 1, 1.5)
    changes, claimed, errors = await store.cycle(
        submissions=[
            Submission("good", None, [spec("g1"), spec("g2", ["g1"])]),
            Submission("bad", None, [spec("b1", ["missing"])]),
            Submission("big", None, [spec("b2", labels={"k": "v" * 2000})]),
        ],
        results=[ok(r, b"R")],
        claims=[ClaimRequest("n1", [""], 10)],
        now=2.0,
    )
    assert errors[0] is None
    assert isinstance(errors[1], SubmissionError)
    assert "missing" in str(errors[1])
    assert isinstance(errors[2], SubmissionError)
    assert "b2" in str(errors[2])
    assert changes.accepted == [r.lease_id]
    assert [c.task_id for c in claimed["n1"]] == ["g1"]
    assert await store.task("b1") is None
    assert await store.task("b2") is None
    assert await store.job("bad") is None
    assert await store.job("big") is None
    good = await store.job("good")
    assert good is not None
    assert good.counts == {"leased": 1, "waiting": 1}
    assert await state(store, "running") == S.SUCCEEDED


# --- cancel --------------------------------------------------------------------------


async def test_cancel_stops_tasks_in_every_open_state(store: SqlStore) -> None:
    await store.submit(
        "j1", None, [spec("l", priority=3), spec("run", priority=3), spec("done", priority=3)], 1.0
    )
    got = await claim_all(store, "n1", 2.0)
    await store.mark_running([("run", got["run"].lease_id)], 2.5)
    await store.complete([ok(got["done"])], 3.0)
    await store.submit(
        "j2",
        None,
        [spec("blocker"), spec("r"), spec("w", ["blocker"]), spec("d", ["run"])],
        4.0,
    )

    ch = await store.cancel(["w", "r", "l", "run", "done", "ghost"], None, 5.0)
    assert finals_of(ch) == {
        ("w", S.CANCELLED, "cancelled"),
        ("r", S.CANCELLED, "cancelled"),
        ("l", S.CANCELLED, "cancelled"),
        ("run", S.CANCELLED, "cancelled"),
        ("d", S.FAILED, "dependency failed"),
    }
    assert sorted(ch.cancel_leases) == sorted(
        [("n1", got["l"].lease_id), ("n1", got["run"].lease_id)]
    )
    assert await state(store, "done") == S.SUCCEEDED
    assert await state(store, "blocker") == S.READY
    assert await attempt_rows(store, "run") == [
        (1, got["run"].lease_id, "n1", "cancelled", "cancelled")
    ]
    assert await store.leases_of("n1") == []

    # the node's late result for the cancelled lease: acknowledged, not recorded
    ch = await store.complete([ok(got["run"])], 6.0)
    assert ch.accepted == [got["run"].lease_id]
    assert ch.finals == []
    rec = await store.task("run")
    assert rec is not None
    assert rec.state == S.CANCELLED
    [f] = await store.finals(["run"])
    assert f.result is None
    assert len(await attempt_rows(store, "run")) == 1
    await store.mark_running([("l", got["l"].lease_id)], 7.0)
    assert await state(store, "l") == S.CANCELLED


async def test_cancel_by_job_and_ids_lists_each_lease_once(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b")], 1.0)
    await store.submit("other", None, [spec("o")], 1.0)
    got = await store.claim("n1", [""], 1, 2.0)
    ch = await store.cancel(["a"], "j", 3.0)
    assert ch.cancel_leases == [("n1", got[0].lease_id)]
    assert sorted(f.task_id for f in ch.finals) == ["a", "b"]
    assert await store.counts() == {"cancelled": 2, "ready": 1}
    assert (await store.cancel(["a"], "j", 4.0)).finals == []


# --- nodes ---------------------------------------------------------------------------


def node(state: NodeState = NodeState.REQUESTED, name: str = "n1") -> NodeRecord:
    return NodeRecord(
        id="n1",
        name=name,
        state=state,
        provider="local",
        labels={"gpu": "1"},
        slots=2,
        host="h",
        pid=10,
        created_at=1.0,
        last_seen=None,
        reason=None,
    )


async def test_nodes_move_through_their_state_machine(store: SqlStore) -> None:
    await store.upsert_node(node())
    await store.upsert_node(node(name="renamed"))
    [n] = await store.nodes()
    assert (n.name, n.state, n.labels, n.slots) == ("renamed", NodeState.REQUESTED, {"gpu": "1"}, 2)

    path = [
        NodeState.BOOTING,
        NodeState.CONNECTED,
        NodeState.READY,
        NodeState.BUSY,
        NodeState.READY,
        NodeState.DRAINING,
        NodeState.TERMINATED,
    ]
    for i, target in enumerate(path):
        rec = await store.set_node_state("n1", target, "drained" if i == 6 else None, 10.0 + i)
        assert rec is not None
        assert rec.state == target
    same = await store.set_node_state("n1", NodeState.TERMINATED, None, 30.0)
    assert same is not None
    assert same.state == NodeState.TERMINATED

    evs = [e for e in await store.events(limit=1000) if e.node_id == "n1"]
    assert [e.action for e in evs] == ["node_requested", "node_requested"] + [
        "node_" + s.value for s in path
    ]
    assert [e.data["from"] for e in evs[2:]] == ["requested", *(s.value for s in path[:-1])]

    before = await snapshot(store)
    with pytest.raises(InvalidTransition):
        await store.set_node_state("n1", NodeState.BUSY, None, 40.0)
    assert await snapshot(store) == before
    [n] = await store.nodes()
    assert (n.state, n.reason) == (NodeState.TERMINATED, "drained")
    assert await store.nodes(alive_only=True) == []
    assert await store.set_node_state("ghost", NodeState.READY, None, 41.0) is None


# --- queries -------------------------------------------------------------------------


async def test_task_queries_filter_and_page_stably(store: SqlStore) -> None:
    await store.submit("ja", "A", [spec(f"a{i}") for i in range(5)], 1.0)
    await store.submit("jb", "B", [spec("b0"), spec("b1", ["b0"]), spec("b2")], 2.0)
    order = ["a0", "a1", "a2", "a3", "a4", "b0", "b1", "b2"]
    got = await store.claim("n1", [""], 2, 3.0)
    assert [c.task_id for c in got] == ["a0", "a1"]

    assert [t.id for t in await store.tasks()] == order
    assert [t.id for t in await store.tasks(states=[S.READY])] == ["a2", "a3", "a4", "b0", "b2"]
    assert [t.id for t in await store.tasks(job_id="jb")] == ["b0", "b1", "b2"]
    assert [t.id for t in await store.tasks(node_id="n1")] == ["a0", "a1"]
    assert [t.id for t in await store.tasks(states=[S.READY], job_id="jb")] == ["b0", "b2"]
    [b1] = await store.tasks(job_id="jb", states=[S.WAITING])
    assert b1.depends_on == ["b0"]

    for size in (1, 3):
        pages: list[str] = []
        after: str | None = None
        while True:
            page = await store.tasks(limit=size, after=after)
            if not page:
                break
            assert len(page) <= size
            pages += [t.id for t in page]
            after = page[-1].id
        assert pages == order
    ready = await store.tasks(states=[S.READY], limit=2)
    more = await store.tasks(states=[S.READY], limit=10, after=ready[-1].id)
    assert [t.id for t in ready + more] == ["a2", "a3", "a4", "b0", "b2"]

    # several states merged in order, newest first, a name glob; pages in both directions
    pending = [S.WAITING, S.READY]
    assert [t.id for t in await store.tasks(states=pending)] == ["a2", "a3", "a4", "b0", "b1", "b2"]
    newest = await store.tasks(states=pending, descending=True, limit=4)
    assert [t.id for t in newest] == ["b2", "b1", "b0", "a4"]
    older = await store.tasks(states=pending, descending=True, after=newest[-1].id)
    assert [t.id for t in older] == ["a3", "a2"]
    assert [t.id for t in await store.tasks(name="b*")] == ["b0", "b1", "b2"]
    assert [t.id for t in await store.tasks(name="?1")] == ["a1", "b1"]
    assert await store.tasks(name="b%") == []  # LIKE wildcards are literal in a glob

    ja = await store.job("ja")
    assert ja is not None
    assert (ja.name, ja.counts, ja.total) == ("A", {"leased": 2, "ready": 3}, 5)
    assert not ja.finished
    assert await store.job("nope") is None
    assert sorted((j.id, j.total) for j in await store.jobs()) == [("ja", 5), ("jb", 3)]
    assert await store.counts() == {"leased": 2, "ready": 5, "waiting": 1}


async def test_attempts_lists_ended_attempts_then_the_current_lease(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a")], 1.0)
    [c1] = await store.claim("n1", [""], 1, 2.0)
    await store.complete([fail(c1, "timeout")], 3.0)
    [c2] = await store.claim("n2", [""], 1, 4.0)
    await store.mark_running([("a", c2.lease_id)], 5.0)
    got = await store.attempts("a")
    assert [(a.attempt, a.lease_id, a.node_id, a.outcome, a.reason) for a in got] == [
        (1, c1.lease_id, "n1", "failed", "timeout"),
        (2, c2.lease_id, "n2", None, None),
    ]
    assert (got[0].leased_at, got[0].ended_at) == (2.0, 3.0)
    assert (got[1].leased_at, got[1].started_at, got[1].ended_at) == (4.0, 5.0, None)
    await store.complete([ok(c2)], 6.0)
    assert [a.outcome for a in await store.attempts("a")] == ["failed", "succeeded"]
    assert await store.attempts("nope") == []


async def test_the_timeline_lists_attempts_of_a_job_in_start_order(store: SqlStore) -> None:
    await store.submit("j", None, [spec("a"), spec("b")], 1.0)
    await store.submit("k", None, [spec("c")], 1.5)
    [ca] = await store.claim("n1", [""], 1, 2.0)
    await store.complete([fail(ca, "error")], 3.0)
    got = await store.claim("n2", [""], 2, 4.0)
    await store.mark_running([(c.task_id, c.lease_id) for c in got], 5.0)
    await store.complete([ok(c) for c in got if c.task_id == "a"], 6.0)
    rows = await store.timeline(job_id="j")
    assert [(r["task_id"], r["attempt"], r["node_id"], r["state"]) for r in rows] == [
        ("a", 1, "n1", "failed"),
        ("a", 2, "n2", "succeeded"),
        ("b", 1, "n2", "running"),
    ]
    assert (rows[1]["start"], rows[1]["end"], rows[2]["end"]) == (5.0, 6.0, None)
    assert [r["task_id"] for r in await store.timeline(since=3.5)] == ["a", "b"]
    job = await store.job("j")
    assert job is not None
    assert job.started_at == 2.0  # its first lease


async def test_telemetry_samples_roll_up_into_minutes_and_expire(store: SqlStore) -> None:
    def point(node: str, at: float, cpu: float) -> Sample:
        return Sample(node, "", 1, at, {"cpu_percent": cpu})

    await store.add_samples([point("n1", 600 + i, float(i)) for i in range(120)])
    await store.add_samples([point("n1", 600, 99.0), Sample("n1", "t1", 1, 600, {"loss": 0.5})])
    fine = await store.samples("n1", 0, 1)
    assert len(fine) == 120
    assert fine[0].data == {"cpu_percent": 99.0}  # the same second again: the last wins
    assert [s.data for s in await store.samples("n1", 0, 1, task_id="t1")] == [{"loss": 0.5}]
    # fine samples before 690 go into whole minutes only: [600, 660) complete, 660.. not
    moved = await store.roll_up_samples(fine_before=690, coarse_before=0, resolution=60)
    assert moved == 61  # 60 of n1's and t1's one
    [minute] = await store.samples("n1", 0, 60)
    assert minute.at == 600
    assert minute.data["cpu_percent"] == pytest.approx((99 + sum(range(1, 60))) / 60)
    assert [s.at for s in await store.samples("n1", 0, 1)][:1] == [660]
    assert await store.samples(None, 650, 1) != []  # every node's
    await store.roll_up_samples(fine_before=690, coarse_before=700, resolution=60)
    assert await store.samples("n1", 0, 60) == []  # older than a day: gone


# --- scale: finishing a task costs its own edges ---------------------------------------


# SQLite plans without statistics: starting from a state (ix_tasks_state_seq)
# means reading every task in that state. PostgreSQL plans by cost from
# statistics, so there only a sequential scan is wrong.
_BAD_PLAN = re.compile(r"^SCAN (tasks|deps|dep)\b|ix_tasks_state_seq|TEMP B-TREE FOR ORDER BY")
_BAD_PG_PLAN = re.compile(r"Seq Scan on (tasks|deps)")


async def test_finishing_a_task_touches_only_its_own_edges(store: SqlStore) -> None:
    """20,000 unrelated waiting tasks: releasing or failing dependents must not read them."""
    n = 20_000
    await store.submit(
        "crowd", None, [spec("blocker")] + [spec(f"w{i}", ["blocker"]) for i in range(n)], 1.0
    )
    await store.submit(
        "mine",
        None,
        [
            spec("a", priority=9),
            spec("a1", ["a"], priority=9),
            spec("f", max_attempts=1, priority=9),
            spec("f1", ["f"]),
        ],
        2.0,
    )
    got = await store.claim("n1", [""], 2, 3.0)
    assert sorted(c.task_id for c in got) == ["a", "f"]
    by_id = {c.task_id: c for c in got}
    if not store.is_sqlite:
        await store._write(lambda conn: conn.exec_driver_sql("ANALYZE"))

    seen: list[tuple[str, Any]] = []

    def note(statement: str, parameters: Any) -> None:
        if re.search(r"\b(tasks|deps)\b", statement) and not statement.lstrip().startswith(
            "INSERT"
        ):
            seen.append((statement, parameters))

    def capture(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        note(statement, parameters[0] if many else parameters)

    # SQLite's hot statements skip SQLAlchemy (herder.store.prepared): the driver's
    # trace sees them all, their parameters written in
    await trace_writes(store, lambda sql: note(sql, ()))
    engine = store._writer if store.is_sqlite else store._async_engine.sync_engine  # type: ignore[union-attr]
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        ch = await store.complete([ok(by_id["a"], b"A")], 4.0)
        assert ch.newly_ready == 1
        ch = await store.complete([fail(by_id["f"])], 5.0)
        assert finals_of(ch) == {("f", S.FAILED, "error"), ("f1", S.FAILED, "dependency failed")}
        [c] = await store.claim("n1", [""], 1, 6.0)
        assert c.task_id == "a1"
        assert c.dep_results == {"a": b"A"}
        # a node with labels claims over several keys: each key's index head, no sort
        [c] = await store.claim("n2", ["", "gpu=1"], 1, 7.0)
        assert c.task_id == "blocker"
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
        await trace_writes(store, None)
    assert await store.counts() == {"waiting": n, "succeeded": 1, "failed": 2, "leased": 2}
    assert len(seen) >= 5

    plans = await explain(store, seen)
    for statement, plan in plans:
        bad = [
            line
            for line in plan
            if (_BAD_PLAN if store.is_sqlite else _BAD_PG_PLAN).search(line.strip())
        ]
        assert not bad, f"{statement}\n{plan}"


async def trace_writes(store: SqlStore, callback: Callable[[str], object] | None) -> None:
    """On SQLite, call ``callback`` with each statement the writer's connection runs
    (None: stop); a no-op on PostgreSQL."""
    if store.is_sqlite:
        await store._write(lambda conn: driver_of(conn).set_trace_callback(callback))


async def explain(
    store: SqlStore, statements: list[tuple[str, Any]]
) -> list[tuple[str, list[str]]]:
    """The query plan of each captured statement, with its parameters."""
    out: list[tuple[str, list[str]]] = []
    if store.is_sqlite:
        conn = sqlite3.connect(store.url.removeprefix("sqlite:///"))
        try:
            for statement, params in statements:
                plan = conn.execute("EXPLAIN QUERY PLAN " + statement, params).fetchall()
                out.append((statement, [str(r[-1]) for r in plan]))
        finally:
            conn.close()
        return out

    def run(conn: sa.Connection) -> None:
        for statement, params in statements:
            res = conn.exec_driver_sql("EXPLAIN " + statement, tuple(params))
            out.append((statement, [r[0] for r in res]))

    await store._read(run)
    return out


# --- property: random operations keep the invariants -----------------------------------


N_TASKS = 6
NODES = ("n1", "n2")


@st.composite
def dags(draw: st.DrawFn) -> list[tuple[list[int], int, bool, int]]:
    """Task i depends on up to two of the tasks before it."""
    out = []
    for i in range(N_TASKS):
        deps = sorted(draw(st.sets(st.integers(0, i - 1), max_size=min(i, 2)))) if i else []
        out.append((deps, draw(st.integers(1, 3)), draw(st.booleans()), draw(st.integers(0, 2))))
    return out


_claim = st.tuples(st.just("claim"), st.sampled_from(NODES), st.integers(1, 3))
_result = st.tuples(
    st.sampled_from(["ok", "ok", "fail", "stale", "run", "release"]), st.integers(0, 9)
)
# one_of draws its branches evenly: repeats weight it towards progress
operation = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 1)),
    _claim,
    _claim,
    _result,
    _result,
    _result,
    st.tuples(st.just("requeue"), st.sampled_from(NODES)),
    st.tuples(st.just("cancel"), st.integers(0, N_TASKS - 1)),
)


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(shape=dags(), ops=st.lists(operation, min_size=10, max_size=40))
def test_random_operations_keep_the_invariants(
    store_url: str, shape: list[tuple[list[int], int, bool, int]], ops: list[tuple[Any, ...]]
) -> None:
    if store_url.startswith("sqlite"):
        with tempfile.TemporaryDirectory() as tmp:
            asyncio.run(_run_random(f"sqlite:///{Path(tmp) / 'herd.db'}", shape, ops, reset=False))
    else:
        asyncio.run(_run_random(store_url, shape, ops, reset=True))


async def _run_random(
    url: str,
    shape: list[tuple[list[int], int, bool, int]],
    ops: list[tuple[Any, ...]],
    *,
    reset: bool,
) -> None:
    specs = [
        spec(
            f"t{i}",
            [f"t{d}" for d in deps],
            max_attempts=attempts,
            rof=rof,
            priority=prio,
        )
        for i, (deps, attempts, rof, prio) in enumerate(shape)
    ]
    deps_of = {s.id: s.depends_on for s in specs}
    rof_of = {s.id: s.run_on_failure for s in specs}
    batches = [specs[: N_TASKS // 2], specs[N_TASKS // 2 :]]
    store = SqlStore(url)
    await store.open()
    if reset:
        await store._write(lambda conn: conn.exec_driver_sql("TRUNCATE " + ", ".join(TABLES)))
    try:
        await store.submit("j", None, batches[0], 1.0)
        submitted: list[str] = [s.id for s in batches[0]]
        n_batches = 1
        leases: list[Claimed] = []  # every lease ever handed out, stale ones included
        finished_attempts: dict[str, int] = {}  # final task -> attempts rows at that point
        now = 1.0
        for op in ops:
            now += 1.0
            kind = op[0]
            if kind == "submit":
                if n_batches < len(batches):
                    await store.submit("j", None, batches[n_batches], now)
                    submitted += [s.id for s in batches[n_batches]]
                    n_batches += 1
                else:  # a retry of an earlier batch: a no-op
                    before = await snapshot(store)
                    await store.submit("j", None, batches[op[1]], now)
                    assert await snapshot(store) == before
            elif kind == "claim":
                ready = {t.id for t in await store.tasks(states=[S.READY], limit=100)}
                got = await store.claim(op[1], [""], op[2], now)
                assert {c.task_id for c in got} <= ready
                assert not {c.task_id for c in got} & set(finished_attempts)
                assert len(got) == min(op[2], len(ready))
                leases += got
            elif kind == "requeue":
                await store.requeue_node(op[1], "lost heartbeat", now)
            elif kind == "cancel":
                if f"t{op[1]}" in submitted:
                    await store.cancel([f"t{op[1]}"], None, now)
            elif leases:
                c = leases[-1 - op[1] % len(leases)]  # recent leases are likelier current
                rec = await store.task(c.task_id)
                assert rec is not None
                current = rec.lease_id == c.lease_id and rec.state in (S.LEASED, S.RUNNING)
                if kind == "run":
                    await store.mark_running([(c.task_id, c.lease_id)], now)
                    want = S.RUNNING if current else rec.state
                    assert await state(store, c.task_id) == want
                elif kind == "release":
                    await store.release_leases([(c.task_id, c.lease_id)], now)
                elif kind == "stale":
                    before = await snapshot(store)
                    ch = await store.complete(
                        [TaskResult(c.task_id, c.lease_id + "-old", S.SUCCEEDED, result=b"x")], now
                    )
                    assert ch.refused == [c.lease_id + "-old"]
                    assert await snapshot(store) == before
                else:
                    result = ok(c) if kind == "ok" else fail(c)
                    before = await snapshot(store)
                    ch = await store.complete([result], now)
                    if current:
                        assert ch.accepted == [c.lease_id]
                        assert ch.refused == []
                        assert await state(store, c.task_id) != rec.state
                    else:  # stale, or recorded already: acknowledged or not, nothing changes
                        assert await snapshot(store) == before
            await _check_invariants(store, submitted, deps_of, rof_of, finished_attempts)
    finally:
        await store.close()


async def _check_invariants(
    store: SqlStore,
    submitted: list[str],
    deps_of: dict[str, list[str]],
    rof_of: dict[str, bool],
    finished_attempts: dict[str, int],
) -> None:
    tasks = await rows(
        store, "SELECT id, state, attempt, max_attempts, lease_id, node_id FROM tasks"
    )
    assert sorted(t[0] for t in tasks) == sorted(submitted)  # each task once, one state
    assert sum((await store.counts()).values()) == len(submitted)
    states = {t[0]: S(t[1]) for t in tasks}
    n_attempts = dict(await rows(store, "SELECT task_id, count(*) FROM attempts GROUP BY task_id"))
    wins = dict(
        await rows(
            store,
            "SELECT task_id, count(*) FROM attempts WHERE outcome = 'succeeded' GROUP BY task_id",
        )
    )
    for tid, st_, attempt, max_attempts, lease_id, node_id in tasks:
        st_ = S(st_)
        assert 0 <= attempt <= max_attempts, tid
        assert wins.get(tid, 0) <= 1, tid
        if st_ == S.SUCCEEDED:
            assert wins.get(tid) == 1, tid
        if st_ in (S.LEASED, S.RUNNING):
            assert lease_id, tid
            assert node_id, tid
        if st_ in (S.WAITING, S.READY):
            assert (lease_id, node_id) == (None, None), tid
        if st_ == S.WAITING:
            assert attempt == 0, tid
        dep_states = [states[d] for d in deps_of[tid]]
        if st_ == S.READY or attempt > 0 or n_attempts.get(tid):  # runnable, now or once
            if rof_of[tid]:
                assert all(d.is_final for d in dep_states), tid
            else:
                assert all(d == S.SUCCEEDED for d in dep_states), tid
        if st_ == S.WAITING:  # not runnable yet, and not doomed either
            assert not all(d.is_final for d in dep_states), tid
            if not rof_of[tid]:
                assert not any(d in (S.FAILED, S.CANCELLED) for d in dep_states), tid
        if st_.is_final:
            count = n_attempts.get(tid, 0)
            assert finished_attempts.setdefault(tid, count) == count, tid


def test_an_in_memory_sqlite_store_keeps_its_tables() -> None:
    """``sqlite:///:memory:`` is one database, not one per pooled connection (SQLite only)."""

    async def run() -> None:
        store = SqlStore("sqlite:///:memory:")
        await store.open()
        try:
            await store.submit("j", None, [spec("a"), spec("b", ["a"])], 1.0)
            [c] = await store.claim("n1", [""], 5, 2.0)
            await store.complete([ok(c, b"A")], 3.0)
            assert await store.counts() == {"succeeded": 1, "ready": 1}
            [f] = await store.finals(["a"])
            assert f.result == b"A"
        finally:
            await store.close()

    asyncio.run(run())
