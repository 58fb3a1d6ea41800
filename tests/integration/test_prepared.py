"""SQLite's hot statements on the driver (herder.store.prepared), against SQLAlchemy's path.

Every hot statement runs on two copies of one database: through
:class:`HotStatements` (the driver) and through SQLAlchemy Core. The rows it
returns, the rows it changes and what the tables hold afterwards (column by
column, JSON and Booleans included) must be the same.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from herder.store import schema
from herder.store.prepared import driver_of
from herder.store.statements import HotStatements

NOW = 1_000.0


def _task(i: int, **extra: Any) -> dict[str, Any]:
    return {
        "id": f"t{i}",
        "seq": i,
        "job_id": "j1",
        "name": f"task {i}",
        "kind": "call",
        "state": "ready",
        "priority": i % 3,
        "attempt": 0,
        "max_attempts": 3,
        "ckey": "",
        "labels": {"zone": "a"},
        "payload": b"p%d" % i,
        "n_deps": 0,
        "pending_deps": 0,
        "run_on_failure": False,
        "has_dependents": i % 2 == 0,
        "created_at": NOW,
        **extra,
    }


@pytest.fixture
def engines(tmp_path: Path) -> Iterator[tuple[sa.Engine, sa.Engine]]:
    """Two engines on two identical databases: 40 ready tasks, 10 waiting on them."""
    first = tmp_path / "a.db"
    engine = sa.create_engine(f"sqlite:///{first}")
    schema.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(schema.jobs.insert(), [{"id": "j1", "created_at": NOW}])
        conn.execute(schema.tasks.insert(), [_task(i) for i in range(40)])
        waiting = [_task(i, state="waiting", pending_deps=2) for i in range(40, 50)]
        conn.execute(schema.tasks.insert(), waiting)
        edges = [{"task_id": f"t{i}", "dep_id": f"t{i - 40}"} for i in range(40, 50)]
        conn.execute(schema.deps.insert(), edges)
    engine.dispose()
    shutil.copy(first, tmp_path / "b.db")
    pair = (
        sa.create_engine(f"sqlite:///{first}"),
        sa.create_engine(f"sqlite:///{tmp_path / 'b.db'}"),
    )
    yield pair
    for e in pair:
        e.dispose()


def _tables(engine: sa.Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables the hot path writes, as the driver stores them."""
    path = engine.url.database
    assert path is not None
    with sqlite3.connect(path) as raw:
        return {
            t: sorted(raw.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in ("tasks", "jobs", "attempts", "events", "deps")
        }


# (statement, parameters): one execution each, in this order; "lease ids" makes the
# random lease ids of the claims the same in both databases
CASES: list[tuple[str, Any]] = [
    ("existing", {"ids": ["t1", "t2", "nope"]}),
    ("states_locked", {"ids": [f"t{i}" for i in range(45)]}),
    ("ready_head", {"key": "", "limit": 5}),
    ("claim_by_key", {"node": "n1", "now": NOW, "key": "", "limit": 3}),
    ("claim_by_ids", {"node": "n2", "now": NOW, "ids": ["t10", "t11", "t40"]}),
    ("lease ids", None),
    ("dep_edges", {"ids": ["t40", "t41"]}),
    ("dependent_counts", {"ids": ["t0", "t1", "t2"]}),
    ("count_down", [{"tid": "t40", "n": 2}, {"tid": "t41", "n": 1}]),
    ("wake_ready", {"ids": ["t40", "t41"]}),
    ("lease_rows", {"ids": ["t10", "t11", "t12"]}),
    ("mark_running", [{"tid": "t11", "lid": "L-t11", "now": NOW}]),
    (
        "finish",
        [
            {
                "tid": "t10",
                "lid": "L-t10",
                "state": "succeeded",
                "reason": None,
                "result": b"r",
                "error": None,
                "error_pickle": None,
                "output": {"phases": {"run": 0.5}},
                "started_at": NOW,
                "finished_at": NOW + 1,
            }
        ],
    ),
    ("hand_back", {"tid": "t11", "lid": "L-t11"}),
    (
        "fail_waiting",
        {
            "ids": ["t42", "t43"],
            "reason": "dependency failed",
            "error": {"type": "DependencyFailed"},
            "now": NOW,
        },
    ),
    ("waiting_rows", {"ids": ["t42", "t44", "t45"]}),
    ("mark_dependents", {"ids": ["t1", "t3"]}),
    ("job_started", {"ids": ["j1"], "now": NOW}),
    (
        "insert_attempts",
        [
            {
                "lease_id": "L-t10",
                "task_id": "t10",
                "attempt": 1,
                "node_id": "n2",
                "leased_at": NOW,
                "started_at": None,
                "ended_at": NOW,
                "outcome": "succeeded",
                "reason": None,
                "error": None,
                "phases": {"run": 0.5},
            }
        ],
    ),
    (
        "insert_events",
        [
            {
                "at": NOW,
                "action": "task_retry",
                "task_id": "t3",
                "node_id": None,
                "lease_id": None,
                "data": {"why": ["a", 1]},
            }
        ],
    ),
    ("recorded", {"ids": ["L-t10", "L-t99"]}),
]


# the statements that return rows (SELECT, UPDATE ... RETURNING); the others: a row count
RETURNING = {
    "existing",
    "states_locked",
    "ready_head",
    "claim_by_key",
    "claim_by_ids",
    "dep_edges",
    "dependent_counts",
    "lease_rows",
    "waiting_rows",
    "recorded",
}


def _run(hot: HotStatements, conn: sa.Connection, name: str, params: Any, *, fast: bool) -> Any:
    if name == "lease ids":
        conn.exec_driver_sql("UPDATE tasks SET lease_id = 'L-' || id WHERE lease_id IS NOT NULL")
        return None
    stmt = getattr(hot, name)
    if isinstance(params, list):
        if fast:
            hot.run_many(conn, stmt, params)
        else:
            conn.execute(stmt, params)
        return None
    if name in RETURNING:
        rows = hot.rows(conn, stmt, params) if fast else conn.execute(stmt, params)
        return [tuple(r) for r in rows]
    return hot.run(conn, stmt, params) if fast else conn.execute(stmt, params).rowcount


def test_every_hot_statement_reads_and_writes_as_sqlalchemy_does(
    engines: tuple[sa.Engine, sa.Engine],
) -> None:
    hot = HotStatements(is_sqlite=True)
    fast_engine, slow_engine = engines
    with fast_engine.begin() as fast, slow_engine.begin() as slow:
        for name, params in CASES:
            got = _run(hot, fast, name, params, fast=True)
            want = _run(hot, slow, name, params, fast=False)
            if name.startswith("claim"):  # lease ids are random: compare the rest
                got = sorted(r[:1] + r[2:] for r in got)
                want = sorted(r[:1] + r[2:] for r in want)
            assert got == want, name
    assert _tables(fast_engine) == _tables(slow_engine)


def test_rows_decode_json_and_booleans(engines: tuple[sa.Engine, sa.Engine]) -> None:
    hot = HotStatements(is_sqlite=True)
    with engines[0].begin() as conn:
        [row] = hot.rows(conn, hot.lease_rows, {"ids": ["t0"]})
        assert row.has_dependents is True
        assert row.service is None
        [claimed] = hot.rows(conn, hot.claim_by_ids, {"node": "n", "now": NOW, "ids": ["t0"]})
        assert claimed.command is None
        assert claimed.payload == b"p0"
        assert len(claimed.lease_id) == 16


def test_a_list_of_any_length_is_one_parameter(engines: tuple[sa.Engine, sa.Engine]) -> None:
    """One SQL text for 0, 1 and 2,000 ids (json_each), so the driver keeps it prepared."""
    hot = HotStatements(is_sqlite=True)
    with engines[0].begin() as conn:
        for ids in ([], ["t1"], [f"t{i}" for i in range(2000)]):
            found = hot.rows(conn, hot.existing, {"ids": ids})
            assert sorted(r.id for r in found) == sorted(i for i in ids if int(i[1:]) < 50)
        assert "json_each(?)" in hot._prepare(conn, hot.existing).sql


def test_only_the_hot_statements_run_prepared(engines: tuple[sa.Engine, sa.Engine]) -> None:
    hot = HotStatements(is_sqlite=True)
    with engines[0].begin() as conn, pytest.raises(ValueError, match="HotStatements"):
        hot.rows(conn, sa.select(schema.tasks.c.id), {})


def test_a_locked_database_raises_as_sqlalchemy_does(
    engines: tuple[sa.Engine, sa.Engine],
) -> None:
    """``OperationalError``: what the store turns into a 503 and a retry."""
    hot = HotStatements(is_sqlite=True)
    path = engines[0].url.database
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        engine = sa.create_engine(f"sqlite:///{path}", connect_args={"timeout": 0.1})
        with engine.connect() as conn:
            driver_of(conn).isolation_level = None
            with pytest.raises(sa.exc.OperationalError, match="locked"):
                hot.run(conn, hot.mark_dependents, {"ids": ["t1"]})
        engine.dispose()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
