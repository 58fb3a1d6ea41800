"""The store's migration history on real SQLite and PostgreSQL (fixture ``store_url``).

The head revision builds exactly what ``schema.metadata`` describes; a store
at another revision is refused on open with a message saying what to run;
``herder db upgrade`` (a real process) takes a store with data from the first
schema, or one made before migrations existed, to the current one.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from herder.errors import SchemaMismatch
from herder.model import TaskSpec, TaskState
from herder.store import migrate, schema
from herder.store.base import TaskResult
from herder.store.sql import SqlStore, async_url

T = TypeVar("T")
HEAD = migrate.code_revision()


async def on_conn(url: str, fn: Callable[[sa.Connection], T]) -> T:
    """Run ``fn`` on a plain connection of the database, outside any SqlStore."""
    engine = create_async_engine(async_url(url))
    try:
        async with engine.begin() as conn:
            return await conn.run_sync(fn)
    finally:
        await engine.dispose()


def structure(conn: sa.Connection) -> dict[str, Any]:
    """Tables, columns (type, nullability, server default), keys and indexes, as the
    database reports them, plus each index's own DDL as the database keeps it."""
    insp = sa.inspect(conn)
    out: dict[str, Any] = {}
    for table in sorted(set(insp.get_table_names()) - {"alembic_version"}):
        out[table] = {
            "columns": [
                (c["name"], str(c["type"].compile(conn.dialect)), c["nullable"], c.get("default"))
                for c in insp.get_columns(table)
            ],
            "pk": insp.get_pk_constraint(table)["constrained_columns"],
            "fks": insp.get_foreign_keys(table),
            "uniques": insp.get_unique_constraints(table),
            "indexes": sorted(
                (
                    i["name"],
                    tuple(map(str, i["column_names"])),
                    i["unique"],
                    sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                )
                for i in insp.get_indexes(table)
            ),
        }
    if conn.dialect.name == "sqlite":
        ddl = "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
    else:
        ddl = "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"
    out["index DDL"] = sorted(tuple(r) for r in conn.exec_driver_sql(ddl))
    return out


def drop_everything(conn: sa.Connection) -> None:
    schema.metadata.drop_all(conn)
    conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")


def herder_db(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``herder db ARGS`` in a process of its own, as an operator runs it."""
    env = {**os.environ, "HERDER_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "herder", "db", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def test_head_builds_exactly_what_the_metadata_describes(store_url: str) -> None:
    await on_conn(store_url, lambda c: migrate.run_revisions(c, "head"))
    by_history = await on_conn(store_url, structure)
    diffs = await on_conn(
        store_url,
        lambda c: compare_metadata(
            MigrationContext.configure(c, opts={"compare_type": True}),
            schema.for_dialect(c.dialect.name),
        ),
    )
    assert diffs == []
    await on_conn(store_url, drop_everything)

    store = SqlStore(store_url)  # a new store: made from the metadata, stamped
    await store.open()
    await store.close()
    by_metadata = await on_conn(store_url, structure)
    assert by_history == by_metadata
    assert {"tasks", "deps", "jobs", "nodes", "meta"} <= set(by_history)


async def test_a_new_store_is_made_at_head_and_stamped(store_url: str) -> None:
    assert migrate.revision_of(schema.SCHEMA_VERSION) == HEAD
    store = SqlStore(store_url)
    assert (await store.schema_state()).empty
    await store.open()
    try:
        state = await store.schema_state()
        assert (state.store, state.code, state.is_current) == (HEAD, HEAD, True)
        assert await store.get_meta("schema") == str(schema.SCHEMA_VERSION)
    finally:
        await store.close()
    # Alembic itself reads the stamp as its head, and has nothing left to run
    current = await on_conn(
        store_url, lambda c: MigrationContext.configure(c).get_current_revision()
    )
    assert current == HEAD
    await on_conn(store_url, lambda c: migrate.run_revisions(c, "head"))


def test_opening_a_current_store_does_not_import_alembic(tmp_path: Path) -> None:
    """Alembic costs every coordinator start 40 MB and 0.1 s; only upgrades need it."""
    probe = (
        "import asyncio, sys\n"
        "from herder.store.sql import SqlStore\n"
        "async def main():\n"
        f"    for _ in range(2):\n"  # made, then reopened
        f"        s = SqlStore('sqlite:///{tmp_path / 'herd.db'}')\n"
        "        await s.open()\n"
        "        await s.close()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'asyncpg')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


def _first_schema_rows(conn: sa.Connection) -> None:
    """Rows as herder's first release wrote them: a job whose first task is done,
    the second ready and the third waiting on the second; a node; an attempt."""
    task = (
        "INSERT INTO tasks (id, seq, job_id, name, kind, state, priority, attempt, "
        "max_attempts, ckey, labels, payload, n_deps, pending_deps, run_on_failure, "
        "has_dependents, result, created_at, finished_at) VALUES (:id, :seq, 'j-old', :id, "
        "'call', :state, 0, :attempt, 3, '', '{}', :payload, :n, :n, :f, :dependents, :result, "
        "1.0, :fin)"
    )
    no = False
    conn.execute(
        sa.text(task),
        [
            dict(
                id="t-done", seq=1, state="succeeded", attempt=1, payload=b"p1", n=0, f=no,
                dependents=no, result=b"r1", fin=2.0,
            ),
            dict(
                id="t-ready", seq=2, state="ready", attempt=0, payload=b"p2", n=0, f=no,
                dependents=True, result=None, fin=None,
            ),
            dict(
                id="t-wait", seq=3, state="waiting", attempt=0, payload=b"p3", n=1, f=no,
                dependents=no, result=None, fin=None,
            ),
        ],
    )  # fmt: skip
    conn.execute(sa.text("INSERT INTO deps (task_id, dep_id) VALUES ('t-wait', 't-ready')"))
    conn.execute(sa.text("INSERT INTO jobs (id, name, created_at) VALUES ('j-old', 'old', 1.0)"))
    conn.execute(
        sa.text(
            "INSERT INTO attempts (lease_id, task_id, attempt, node_id, leased_at, ended_at, "
            "outcome) VALUES ('l-1', 't-done', 1, 'n-old', 1.5, 2.0, 'succeeded')"
        )
    )
    conn.execute(
        sa.text(
            "INSERT INTO nodes (id, name, state, provider, labels, slots, created_at) "
            "VALUES ('n-old', 'old', 'terminated', 'local', '{\"zone\": \"a\"}', 2, 1.0)"
        )
    )


async def test_db_upgrade_takes_a_first_schema_store_with_data_to_head(
    store_url: str, tmp_path: Path
) -> None:
    await on_conn(store_url, lambda c: migrate.run_revisions(c, "0001"))
    await on_conn(store_url, _first_schema_rows)

    store = SqlStore(store_url)
    with pytest.raises(SchemaMismatch) as refused:
        await store.open()
    await store.close()
    message = str(refused.value)
    assert store_url in message
    assert "0001" in message
    assert HEAD in message
    assert f"herder db upgrade --store {store_url}" in message

    before = herder_db("check", "--store", store_url, home=tmp_path)
    assert before.returncode == 1, before
    assert "store:  0001" in before.stdout
    assert f"herder: {HEAD}" in before.stdout
    assert "herder db upgrade" in before.stderr

    done = herder_db("upgrade", "--store", store_url, home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"upgraded from 0001 to {HEAD}" in done.stdout
    store = SqlStore(store_url)
    assert (await store.schema_state()).is_current
    assert not (await store.upgrade_schema()).changed  # a second upgrade does nothing
    await store.close()

    store = SqlStore(store_url)
    await store.open()
    try:
        assert await store.get_meta("schema") == str(schema.SCHEMA_VERSION)
        done_task = await store.task("t-done")
        assert done_task is not None
        assert (done_task.state, done_task.finished_at) == (TaskState.SUCCEEDED, 2.0)
        (final,) = await store.finals(["t-done"])
        assert final.result == b"r1"
        assert [(a.lease_id, a.node_id) for a in await store.attempts("t-done")] == [
            ("l-1", "n-old")
        ]
        (node,) = await store.nodes()
        assert (node.id, node.labels, node.paused, node.address) == (
            "n-old",
            {"zone": "a"},
            False,
            None,
        )
        # the old queue still works: claim the ready task, which releases its dependent
        (claimed,) = await store.claim("n-new", [""], 10, 10.0)
        assert (claimed.task_id, claimed.payload) == ("t-ready", b"p2")
        await store.complete(
            [TaskResult("t-ready", claimed.lease_id, TaskState.SUCCEEDED, result=b"r2")], 11.0
        )
        (claimed,) = await store.claim("n-new", [""], 10, 12.0)
        assert (claimed.task_id, claimed.dep_results) == ("t-wait", {"t-ready": b"r2"})
        await store.complete(
            [TaskResult("t-wait", claimed.lease_id, TaskState.SUCCEEDED, result=b"r3")], 13.0
        )
        # and a new submission goes through the whole cycle
        await store.submit("j-new", "new", [TaskSpec(id="t-new", kind="call", payload=b"n")], 14)
        (claimed,) = await store.claim("n-new", [""], 10, 15.0)
        assert claimed.task_id == "t-new"
        await store.complete(
            [TaskResult("t-new", claimed.lease_id, TaskState.SUCCEEDED, result=b"r4")], 16.0
        )
        job = await store.job("j-old")
        assert job is not None
        assert job.counts.get("succeeded") == 3
        assert (await store.schema_state()).is_current
    finally:
        await store.close()
    assert await on_conn(store_url, structure) == await _fresh_structure(store_url, tmp_path)


async def _fresh_structure(url: str, tmp_path: Path) -> dict[str, Any]:
    """The structure of a new store on the same backend as ``url``."""
    if url.startswith("sqlite"):
        fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        fresh = url.rsplit("/", 1)[0] + "/" + url.rsplit("/", 1)[1] + "_fresh"
        await _pg_admin(f"CREATE DATABASE {fresh.rsplit('/', 1)[1]}")
    store = SqlStore(fresh)
    await store.open()
    await store.close()
    try:
        return await on_conn(fresh, structure)
    finally:
        if not url.startswith("sqlite"):
            await _pg_admin(f"DROP DATABASE IF EXISTS {fresh.rsplit('/', 1)[1]} WITH (FORCE)")


async def _pg_admin(sql: str) -> None:
    from tests.conftest import PG_ADMIN_URL

    engine = create_async_engine(async_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.exec_driver_sql(sql)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("version", [3, 7])
async def test_a_store_from_before_migrations_is_refused_then_stamped_and_upgraded(
    store_url: str, tmp_path: Path, version: int
) -> None:
    """``meta.schema`` but no ``alembic_version``: as herder left stores before this
    history existed (a schema-3 one possibly without ``ix_tasks_service``)."""
    cluster = "c-from-before"

    def as_legacy(conn: sa.Connection) -> None:
        migrate.run_revisions(conn, migrate.revision_of(version))
        conn.exec_driver_sql("DROP TABLE alembic_version")
        if version == 3:
            conn.exec_driver_sql("DROP INDEX ix_tasks_service")
        conn.exec_driver_sql("INSERT INTO jobs (id, name, created_at) VALUES ('j-legacy', NULL, 1)")
        conn.execute(
            sa.text("INSERT INTO meta (key, value) VALUES ('cluster', :c)"), {"c": cluster}
        )

    await on_conn(store_url, as_legacy)
    store = SqlStore(store_url)
    with pytest.raises(SchemaMismatch, match=rf"schema {version} \(meta.schema.*herder db upgrade"):
        await store.open()
    await store.close()

    store = SqlStore(store_url)
    done = await store.upgrade_schema()
    assert (done.before.split()[0], done.after) == (str(version), HEAD)
    await store.close()
    store = SqlStore(store_url)
    await store.open()
    try:
        assert await store.cluster_id() == cluster
        assert (await store.job("j-legacy")) is not None
    finally:
        await store.close()
    assert await on_conn(store_url, structure) == await _fresh_structure(store_url, tmp_path)


async def test_a_store_from_a_newer_herder_is_refused_everywhere(
    store_url: str, tmp_path: Path
) -> None:
    store = SqlStore(store_url)
    await store.open()
    await store.close()
    await on_conn(
        store_url, lambda c: c.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    )

    store = SqlStore(store_url)
    with pytest.raises(
        SchemaMismatch, match=rf"0099.*newer than this herder's {HEAD}.*upgrade herder"
    ):
        await store.open()
    with pytest.raises(SchemaMismatch, match="upgrade herder"):
        await store.upgrade_schema()
    await store.close()
    check = herder_db("check", "--store", store_url, home=tmp_path)
    assert check.returncode == 1
    assert "upgrade herder" in check.stderr


async def test_coordinators_opening_one_new_postgres_store_at_once_agree(pg_url: str) -> None:
    stores = [SqlStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        clusters = {await s.cluster_id() for s in stores}
        assert len(clusters) == 1
    finally:
        for s in stores:
            await s.close()
