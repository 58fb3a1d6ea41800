"""``herder db vacuum`` on real SQLite and PostgreSQL (fixture ``store_url``): what
goes and what stays, that the store keeps serving while it runs, and that the
hot paths (claim, dependency release) and the vacuum itself read indexes.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from herder.model import TaskSpec, TaskState
from herder.store import schema
from herder.store.base import TaskResult
from herder.store.sql import SqlStore
from herder.store.statements import HotStatements
from herder.store.vacuum import oldest_finished, still_needed

DAY = 86400.0
OLD = time.time() - 40 * DAY  # older than the 30d cutoff
S = TaskState


def spec(tid: str, deps: tuple[str, ...] = ()) -> TaskSpec:
    return TaskSpec(id=tid, kind="call", payload=tid.encode(), depends_on=list(deps))


async def run_all(store: SqlStore, now: float, outcome: dict[str, S] | None = None) -> None:
    """Claim and finish every ready task (waves, for dependencies) at ``now``."""
    outcome = outcome or {}
    for _ in range(10):
        claimed = await store.claim("n-1", [""], 1000, now)
        if not claimed:
            return
        await store.complete(
            [
                TaskResult(c.task_id, c.lease_id, outcome.get(c.task_id, S.SUCCEEDED), result=b"r")
                for c in claimed
            ],
            now,
        )


async def rows(store: SqlStore, sql: str) -> list[tuple[Any, ...]]:
    def run(conn: sa.Connection) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in conn.execute(sa.text(sql))]

    return await store.write_transaction(run)


async def herder_vacuum(url: str, home: Path, *args: str) -> tuple[int, str, str]:
    """``herder db vacuum --finished-before 30d ARGS`` in a process of its own."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "herder",
        "db",
        "vacuum",
        "--finished-before",
        "30d",
        "--store",
        url,
        *args,
        env={**os.environ, "HERDER_HOME": str(home)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_vacuum_forgets_old_finished_tasks_but_not_what_unfinished_ones_need(
    store_url: str, tmp_path: Path
) -> None:
    store = SqlStore(store_url)
    await store.open()
    try:
        # a: all finished long ago (one failed); d: a finished chain (d2 needs d1)
        await store.submit("j-a", "a", [spec("a1"), spec("a2"), spec("a3")], OLD)
        await store.submit("j-d", "d", [spec("d1"), spec("d2", ("d1",))], OLD)
        await run_all(store, OLD, {"a2": S.FAILED})
        # c: finished just now
        await store.submit("j-c", "c", [spec("c1")], time.time())
        await run_all(store, time.time())
        # b: b1 finished long ago, but b2 (not finished) still needs it
        await store.submit("j-b", "b", [spec("b1"), spec("b2", ("b1",)), spec("b3")], OLD)
        claimed = {c.task_id: c for c in await store.claim("n-1", [""], 2, OLD)}
        assert set(claimed) == {"b1", "b3"}
        await store.complete(
            [TaskResult("b1", claimed["b1"].lease_id, S.SUCCEEDED, result=b"r1")], OLD
        )
        await store.complete([TaskResult("b3", claimed["b3"].lease_id, S.SUCCEEDED)], OLD)
        await store.submit("j-e", "e", [spec("e1")], OLD)
        await store.cancel(None, "j-e", OLD)
    finally:
        await store.close()

    archive = tmp_path / "old.jsonl"
    code, out, err = await herder_vacuum(
        store_url, tmp_path, "--archive", str(archive), "--batch", "2"
    )
    assert code == 0, err
    gone = {"a1", "a2", "a3", "d1", "d2", "b3", "e1"}
    assert f"tasks={len(gone)} " in out
    assert "kept_for_dependents=1 " in out
    assert "jobs=3 " in out  # j-a, j-d, j-e; j-b keeps b1 and b2
    assert "archived=7 " in out
    lines = [json.loads(line) for line in archive.read_text().splitlines()]
    archived = {line["task"]["id"]: line for line in lines}
    assert set(archived) == gone
    assert archived["d2"]["depends_on"] == ["d1"]
    assert archived["a2"]["task"]["state"] == "failed"
    assert archived["e1"]["task"]["state"] == "cancelled"
    assert [a["outcome"] for a in archived["a1"]["attempts"]] == ["succeeded"]
    assert archived["a1"]["task"]["payload"] == "YTE="  # base64 of b"a1"

    store = SqlStore(store_url)
    await store.open()
    try:
        left = {r[0]: r[1] for r in await rows(store, "SELECT id, state FROM tasks")}
        assert left == {"b1": "succeeded", "b2": "ready", "c1": "succeeded"}
        assert await rows(store, "SELECT task_id, dep_id FROM deps") == [("b2", "b1")]
        attempts = {r[0] for r in await rows(store, "SELECT task_id FROM attempts")}
        assert attempts == {"b1", "c1"}
        assert {r[0] for r in await rows(store, "SELECT id FROM jobs")} == {"j-b", "j-c"}
        # b2 still gets b1's result, and runs
        (claimed,) = await store.claim("n-1", [""], 10, time.time())
        assert (claimed.task_id, claimed.dep_results) == ("b2", {"b1": b"r1"})
    finally:
        await store.close()


async def _bulk_old_finished(store: SqlStore, n: int) -> None:
    """``n`` tasks finished 40 days ago, set up straight in the tables (fast)."""
    for i in range(0, n, 5000):
        specs = [spec(f"old-{k}") for k in range(i, min(n, i + 5000))]
        await store.submit(f"j-old-{i}", None, specs, OLD)

    def finish(conn: sa.Connection) -> None:
        conn.execute(
            schema.tasks.update()
            .where(schema.tasks.c.state == "ready")
            .values(state="succeeded", finished_at=OLD)
        )

    await store.write_transaction(finish)


async def test_the_store_keeps_serving_while_vacuum_runs(store_url: str, tmp_path: Path) -> None:
    n = 4_000
    store = SqlStore(store_url)
    await store.open()
    try:
        await _bulk_old_finished(store, n)
        vacuum = asyncio.create_task(herder_vacuum(store_url, tmp_path, "--batch", "100"))
        # a coordinator's round trip: submit, claim, complete, until the vacuum is done
        latencies: list[float] = []
        started = time.monotonic()
        while not vacuum.done() and time.monotonic() - started < 120:
            t0 = time.monotonic()
            tid = f"live-{len(latencies)}"
            await store.submit(f"j-{tid}", None, [spec(tid)], time.time())
            (claimed,) = await store.claim("n-1", [""], 1, time.time())
            await store.complete([TaskResult(tid, claimed.lease_id, S.SUCCEEDED)], time.time())
            latencies.append(time.monotonic() - t0)
        code, out, err = await vacuum
        assert code == 0, err
        assert f"tasks={n} " in out
        assert "batches=41 " in out  # 40 full ones and the empty last look
        assert len(latencies) >= 20, latencies
        worst = max(range(len(latencies)), key=latencies.__getitem__)
        assert latencies[worst] < 2.0, (worst, len(latencies), sorted(latencies)[-5:])
        (count,) = await rows(store, "SELECT count(*) FROM tasks")
        assert count == (len(latencies),)
    finally:
        await store.close()


def _plan(conn: sa.Connection, stmt: Any, **params: Any) -> str:
    """The database's plan for ``stmt`` exactly as the store sends it (same SQL, same
    bound parameters): EXPLAIN is put in front of it on its way to the driver."""
    explain = "EXPLAIN QUERY PLAN " if conn.dialect.name == "sqlite" else "EXPLAIN "

    def prefix(*args: Any) -> tuple[str, Any]:
        statement, parameters = args[2], args[3]
        return explain + statement, parameters

    sa.event.listen(conn, "before_cursor_execute", prefix, retval=True)
    try:
        got = conn.execute(stmt, params).cursor.fetchall()
    finally:
        sa.event.remove(conn, "before_cursor_execute", prefix)
    return "\n".join(str(r[-1] if conn.dialect.name == "sqlite" else r[0]) for r in got)


async def test_claims_dependency_release_and_vacuum_read_indexes(store_url: str) -> None:
    """EXPLAIN of the statements that must stay O(log n) as the table grows."""
    store = SqlStore(store_url)
    await store.open()
    try:
        await _bulk_old_finished(store, 10_000)
        for i in range(0, 10_000, 5000):
            heads = [spec(f"head-{k}") for k in range(i, i + 5000)]
            tails = [spec(f"tail-{k}", (f"head-{k}",)) for k in range(i, i + 5000)]
            await store.submit(f"j-live-{i}", None, heads + tails, time.time())
        if not store.is_sqlite:
            await store.write_transaction(lambda conn: conn.exec_driver_sql("ANALYZE"))
        hot = HotStatements(is_sqlite=store.is_sqlite)

        def plans(conn: sa.Connection) -> dict[str, str]:
            return {
                "claim": _plan(conn, hot.ready_head, key="", limit=100),
                "release": _plan(conn, hot.dependent_counts, ids=["head-1", "head-2"]),
                "vacuum": _plan(conn, oldest_finished(OLD + 1, (OLD - 1, "a"), 200)),
                "needed": _plan(conn, still_needed(["head-1", "old-1"])),
            }

        got = await store.write_transaction(plans)
    finally:
        await store.close()
    assert "ix_tasks_ready" in got["claim"], got["claim"]
    assert "ix_deps_dep" in got["release"], got["release"]
    assert "ix_tasks_finished" in got["vacuum"], got["vacuum"]
    assert "ix_deps_dep" in got["needed"], got["needed"]
    for name, plan in got.items():
        assert "SCAN tasks" not in plan, (name, plan)
        assert "Seq Scan" not in plan, (name, plan)


def test_vacuum_options_are_checked_before_the_store_is_touched(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from herder.cli import app

    url = f"sqlite:///{tmp_path / 'herd.db'}"
    runner = CliRunner()
    for args, message in (
        (["--finished-before", "30x"], "--finished-before '30x': give a number and a unit"),
        (["--finished-before", "30d", "--batch", "99999"], "--batch 99999: at most 5000"),
    ):
        got = runner.invoke(app, ["db", "vacuum", "--store", url, *args])
        assert got.exit_code == 1
        assert message in got.output
    assert not (tmp_path / "herd.db").exists()
