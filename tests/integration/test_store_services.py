"""Service tasks in the SQL store, on real SQLite and PostgreSQL (fixture ``store_url``).

A service's run that ends for any reason sends it back to ``ready`` with
``restarts`` + 1 and no attempt charged; only a cancel ends it. These tests
read the tables directly to check the attempts history and the events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pydantic
import pytest
import sqlalchemy as sa

from herder.errors import SubmissionError
from herder.model import CommandSpec, ServiceSpec, TaskSpec, TaskState
from herder.store import migrate
from herder.store.base import Claimed, TaskResult
from herder.store.sql import SqlStore

S = TaskState


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[SqlStore]:
    s = SqlStore(store_url)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def service(tid: str, **settings: Any) -> TaskSpec:
    return TaskSpec(
        id=tid,
        kind="command",
        name=tid,
        command=CommandSpec(run=["serve"]),
        max_attempts=1,  # does not apply to a service
        service=ServiceSpec(**settings),
    )


def command(tid: str, deps: list[str] | None = None) -> TaskSpec:
    return TaskSpec(
        id=tid,
        kind="command",
        command=CommandSpec(run=["true"]),
        depends_on=deps or [],
        max_attempts=2,
    )


def exited(c: Claimed, code: int, *, ran_s: float, at: float) -> TaskResult:
    """The agent's report of a run that exited with ``code`` after ``ran_s`` seconds."""
    return TaskResult(
        c.task_id,
        c.lease_id,
        S.SUCCEEDED if code == 0 else S.FAILED,
        reason=None if code == 0 else "exit code",
        output={"returncode": code},
        started_at=at - ran_s,
        ended_at=at,
    )


async def rows(store: SqlStore, text: str, **params: Any) -> list[tuple[Any, ...]]:
    def run(conn: sa.Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sa.text(text), params)]

    return await store._read(run)


async def runs(store: SqlStore, tid: str) -> list[tuple[Any, ...]]:
    """(outcome, reason) of each recorded run, oldest first."""
    return await rows(
        store,
        "SELECT outcome, reason FROM attempts WHERE task_id = :t ORDER BY leased_at",
        t=tid,
    )


async def restarts_logged(store: SqlStore, tid: str) -> list[dict[str, Any]]:
    return [e.data for e in await store.events(task_id=tid) if e.action == "service_restarted"]


async def counters(store: SqlStore, tid: str) -> tuple[TaskState, int, int]:
    rec = await store.task(tid)
    assert rec is not None
    return rec.state, rec.attempt, rec.restarts


async def claim_one(store: SqlStore, node: str, now: float) -> Claimed:
    [c] = await store.claim(node, [""], 1, now)
    return c


# --- restarts ------------------------------------------------------------------------


async def test_a_service_that_exits_is_restarted_with_a_growing_delay(store: SqlStore) -> None:
    await store.submit("j", None, [service("web", health="true", health_s=2)], 1.0)
    first = await claim_one(store, "n1", 2.0)
    assert first.service == ServiceSpec(health="true", health_s=2)
    assert first.start_delay_s == 0.0
    await store.mark_running([(first.task_id, first.lease_id)], 2.1)

    ch = await store.complete([exited(first, 3, ran_s=0.5, at=2.6)], 2.6)
    assert ch.accepted == [first.lease_id]
    assert ch.finals == []
    assert ch.requeued == ["web"]
    assert ch.newly_ready == 1
    assert await counters(store, "web") == (S.READY, 0, 1)  # attempt not charged

    # the next claim carries what is left of the 1 s delay
    second = await claim_one(store, "n2", 3.0)
    assert second.start_delay_s == pytest.approx(0.6)
    assert second.attempt == 1
    await store.complete([exited(second, 0, ran_s=0.5, at=5.0)], 5.0)
    third = await claim_one(store, "n1", 5.0)
    assert third.start_delay_s == pytest.approx(2.0)  # doubled: a short run again
    await store.complete([exited(third, 3, ran_s=30.0, at=40.0)], 40.0)
    fourth = await claim_one(store, "n1", 40.0)
    assert fourth.start_delay_s == 0.0  # a run of 10 s or more resets it
    await store.complete([exited(fourth, 3, ran_s=1.0, at=41.0)], 41.0)

    assert await counters(store, "web") == (S.READY, 0, 4)
    logged = await restarts_logged(store, "web")
    assert [(d["reason"], d["exit_code"], d["restarts"], d["delay_s"]) for d in logged] == [
        ("exit code", 3, 1, 1.0),
        ("exited", 0, 2, 2.0),
        ("exit code", 3, 3, 0.0),
        ("exit code", 3, 4, 1.0),
    ]
    assert await runs(store, "web") == [
        ("failed", "exit code"),
        ("succeeded", None),
        ("failed", "exit code"),
        ("failed", "exit code"),
    ]
    [listed] = await store.services()
    assert (listed.id, listed.state, listed.restarts, listed.node_id) == ("web", S.READY, 4, None)
    assert listed.last_exit is not None
    assert (listed.last_exit.reason, listed.last_exit.exit_code) == ("exit code", 3)
    assert listed.restart_at == pytest.approx(42.0)


async def test_the_delay_doubles_up_to_a_minute(store: SqlStore) -> None:
    await store.submit("j", None, [service("loop")], 1.0)
    now = 2.0
    delays = []
    for _ in range(9):
        c = await claim_one(store, "n1", now)
        now += c.start_delay_s + 0.5
        await store.complete([exited(c, 1, ran_s=0.5, at=now)], now)
        delays.append((await restarts_logged(store, "loop"))[-1]["delay_s"])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert await counters(store, "loop") == (S.READY, 0, 9)


async def test_a_timeout_or_an_unhealthy_kill_is_a_restart_too(store: SqlStore) -> None:
    await store.submit("j", None, [service("a"), service("b")], 1.0)
    got = {c.task_id: c for c in await store.claim("n1", [""], 2, 2.0)}
    results = [
        TaskResult("a", got["a"].lease_id, S.FAILED, reason="timeout", started_at=2, ended_at=3),
        TaskResult("b", got["b"].lease_id, S.FAILED, reason="unhealthy", started_at=2, ended_at=3),
    ]
    ch = await store.complete(results, 3.0)
    assert sorted(ch.requeued) == ["a", "b"]
    assert ch.finals == []
    for tid, reason in (("a", "timeout"), ("b", "unhealthy")):
        assert await counters(store, tid) == (S.READY, 0, 1)
        [logged] = await restarts_logged(store, tid)
        assert (logged["reason"], logged["exit_code"]) == (reason, None)


async def test_a_result_under_an_old_lease_changes_nothing(store: SqlStore) -> None:
    await store.submit("j", None, [service("web")], 1.0)
    old = await claim_one(store, "n1", 2.0)
    await store.complete([exited(old, 3, ran_s=0.5, at=2.5)], 2.5)
    new = await claim_one(store, "n2", 3.0)

    # the same report again: it is on record, so acknowledged, and nothing moves
    ch = await store.complete([exited(old, 3, ran_s=0.5, at=2.5)], 4.0)
    assert (ch.accepted, ch.refused, ch.requeued) == ([old.lease_id], [], [])
    # another outcome under the old lease: refused
    ch = await store.complete([exited(old, 0, ran_s=9.0, at=9.0)], 9.0)
    assert (ch.accepted, ch.refused, ch.requeued) == ([], [old.lease_id], [])
    rec = await store.task("web")
    assert rec is not None
    assert (rec.state, rec.lease_id, rec.node_id, rec.restarts) == (
        S.LEASED,
        new.lease_id,
        "n2",
        1,
    )
    assert len(await runs(store, "web")) == 1


async def test_a_lost_node_restarts_its_services_and_charges_its_tasks(store: SqlStore) -> None:
    await store.submit("j", None, [service("web"), command("job")], 1.0)
    got = {c.task_id: c for c in await store.claim("n1", [""], 2, 2.0)}
    await store.mark_running([(c.task_id, c.lease_id) for c in got.values()], 2.5)

    ch = await store.requeue_node("n1", "lost heartbeat", 9.0)
    assert sorted(ch.requeued) == ["job", "web"]
    assert ch.finals == []
    assert await counters(store, "web") == (S.READY, 0, 1)
    assert await counters(store, "job") == (S.READY, 1, 0)  # an ordinary task is charged
    [logged] = await restarts_logged(store, "web")
    assert (logged["reason"], logged["delay_s"]) == ("lost heartbeat", 0.0)
    assert await runs(store, "web") == [("lost", "lost heartbeat")]
    # max_attempts is 1, yet it runs again (and again)
    again = await claim_one(store, "n2", 10.0)
    assert again.task_id in ("web", "job")


async def test_a_service_handed_back_running_counts_a_restart(store: SqlStore) -> None:
    await store.submit("j", None, [service("run"), service("queued")], 1.0)
    got = {c.task_id: c for c in await store.claim("n1", [""], 2, 2.0)}
    await store.mark_running([("run", got["run"].lease_id)], 2.5)

    ch = await store.release_leases([(c.task_id, c.lease_id) for c in got.values()], 5.0)
    assert sorted(ch.requeued) == ["queued", "run"]
    assert await counters(store, "run") == (S.READY, 0, 1)
    assert await counters(store, "queued") == (S.READY, 0, 0)  # it never ran
    assert await runs(store, "run") == [("released", "handed back")]
    assert await runs(store, "queued") == []
    [logged] = await restarts_logged(store, "run")
    assert logged["reason"] == "handed back"
    # handed back leases are stale: the old agent's late report is refused
    ch = await store.complete([exited(got["run"], 0, ran_s=3, at=5.5)], 6.0)
    assert ch.refused == [got["run"].lease_id]


async def test_cancel_ends_a_service_for_good(store: SqlStore) -> None:
    await store.submit("j", None, [service("web")], 1.0)
    c = await claim_one(store, "n1", 2.0)
    await store.mark_running([(c.task_id, c.lease_id)], 2.5)

    ch = await store.cancel(["web"], None, 3.0)
    assert ch.cancel_leases == [("n1", c.lease_id)]
    # the agent kills it and says so: recorded, no restart
    ch = await store.complete([TaskResult("web", c.lease_id, S.CANCELLED, reason="cancelled")], 3.5)
    assert (ch.accepted, ch.requeued) == ([c.lease_id], [])
    assert await counters(store, "web") == (S.CANCELLED, 1, 0)
    assert await store.claim("n1", [""], 1, 4.0) == []
    assert await store.services() == []
    [ended] = await store.services(ended=True)
    assert (ended.id, ended.state) == ("web", S.CANCELLED)


# --- submission ----------------------------------------------------------------------


async def test_nothing_may_depend_on_a_service(store: SqlStore) -> None:
    with pytest.raises(SubmissionError, match="depends_on names service web"):
        await store.submit("j1", None, [service("web"), command("after", ["web"])], 1.0)
    assert await store.counts() == {}
    await store.submit("j2", None, [service("web")], 1.0)
    with pytest.raises(SubmissionError, match="service web, which never finishes"):
        await store.submit("j3", None, [command("after", ["web"])], 2.0)
    assert await store.counts() == {"ready": 1}


def test_a_call_cannot_be_a_service() -> None:
    with pytest.raises(pydantic.ValidationError, match="only a command task can be a service"):
        TaskSpec(id="t", kind="call", payload=b"x", service=ServiceSpec())


async def test_ordinary_tasks_leave_the_service_column_null(store: SqlStore) -> None:
    await store.submit("j", None, [service("web"), command("plain")], 1.0)
    found = await rows(store, "SELECT id FROM tasks WHERE service IS NOT NULL")
    assert found == [("web",)]
    plain = await store.task("plain")
    assert plain is not None
    assert (plain.service, plain.restarts) == (None, 0)


async def test_the_services_index_comes_with_db_upgrade_to_a_store_made_before_it(
    store_url: str,
) -> None:
    """Schema-3 stores made before ``ix_tasks_service`` existed (no longer made on
    open: ``herder db upgrade`` stamps such a store and adds it)."""
    s = SqlStore(store_url)
    s._connect()

    def as_schema_3_without_index(conn: sa.Connection) -> None:
        migrate.run_revisions(conn, "0003")
        conn.execute(sa.text("DROP INDEX ix_tasks_service"))
        conn.execute(sa.text("DROP TABLE alembic_version"))

    await s._write(as_schema_3_without_index)
    assert (await s.upgrade_schema()).after == migrate.code_revision()
    await s.close()
    s = SqlStore(store_url)
    await s.open()
    try:
        names = await s._read(lambda conn: sa.inspect(conn).get_indexes("tasks"))
        assert "ix_tasks_service" in {i["name"] for i in names}
    finally:
        await s.close()
