"""SQLite's kept-open write connection (herder.store.sqlite_writer) on real files.

The writer sends BEGIN IMMEDIATE, COMMIT and ROLLBACK itself on one
connection for the store's life, so what a failed transaction leaves behind
is its own business: these tests fail a transaction in each way it can fail
(the caller's code raises, the disk is full at commit, the connection dies)
and check that nothing of it is stored and that the next write succeeds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.errors import StoreError
from herder.model import TaskSpec
from herder.store.sql import SqlStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqlStore]:
    s = SqlStore(f"sqlite:///{tmp_path / 'store.db'}")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def specs(count: int, size: int = 0) -> list[TaskSpec]:
    return [
        TaskSpec(id=f"t{i}", kind="call", payload=b"x" * size, max_attempts=1) for i in range(count)
    ]


def stored_tasks(path: Path) -> int:
    """The tasks another connection sees committed."""
    with sqlite3.connect(path) as db:
        count: int = db.execute("SELECT count(*) FROM tasks").fetchone()[0]
    return count


async def test_a_transaction_whose_code_raises_leaves_nothing_and_the_next_commits(
    store: SqlStore, tmp_path: Path
) -> None:
    def insert_then_fail(conn: Connection) -> None:
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('half', 'done')"))
        raise ValueError("the caller's own failure")

    with pytest.raises(ValueError, match="the caller's own failure"):
        await store.write_transaction(insert_then_fail)
    assert await store.get_meta("half") is None
    await store.submit("j1", None, specs(3), now=1.0)
    assert stored_tasks(tmp_path / "store.db") == 3


async def test_a_full_disk_at_commit_is_a_store_error_and_writes_resume_after(
    store: SqlStore, tmp_path: Path
) -> None:
    """SQLITE_FULL (here: the page limit) rolls the whole batch back; then room is made."""
    await store.submit("j0", None, specs(1), now=1.0)
    pages = await store.write_transaction(
        lambda conn: conn.exec_driver_sql("PRAGMA page_count").scalar()
    )
    await store.write_transaction(
        lambda conn: conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")
    )
    big = [
        TaskSpec(id=f"big{i}", kind="call", payload=b"x" * 20_000, max_attempts=1)
        for i in range(50)
    ]
    with pytest.raises(StoreError, match="full"):
        await store.submit("j1", None, big, now=2.0)
    assert stored_tasks(tmp_path / "store.db") == 1
    await store.write_transaction(
        lambda conn: conn.exec_driver_sql("PRAGMA max_page_count = 4294967294")
    )
    await store.submit("j1", None, big, now=3.0)
    assert stored_tasks(tmp_path / "store.db") == 51


async def test_a_connection_that_dies_mid_transaction_is_replaced(
    store: SqlStore, tmp_path: Path
) -> None:
    def close_underneath(conn: Connection) -> None:
        conn.execute(sa.text("INSERT INTO meta (key, value) VALUES ('lost', 'yes')"))
        conn.connection.dbapi_connection.close()  # type: ignore[union-attr]
        conn.execute(sa.text("SELECT 1"))

    with pytest.raises(StoreError, match="closed database"):
        await store.write_transaction(close_underneath)
    await store.submit("j1", None, specs(2), now=1.0)
    assert stored_tasks(tmp_path / "store.db") == 2
    assert await store.get_meta("lost") is None
