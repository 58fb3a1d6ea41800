"""SQLite's one write connection, kept open and driven by hand.

A SQLite store has one writer (one thread, one connection). Taking that
connection from SQLAlchemy's pool and giving it back for every transaction,
with the pool's reset on return and a ``Transaction`` object each time, cost
the write thread about a quarter of its time on a turn that submits and
leases one task (py-spy of ``bench/cpu_split.py``'s store part), as much as
the turn's statements. So the writer keeps one ``Connection`` for the
store's life and says ``BEGIN IMMEDIATE`` / ``COMMIT`` / ``ROLLBACK`` to the
driver itself. The statements in between go through SQLAlchemy Core, or
for the hot path's, straight to the driver (:mod:`herder.store.prepared`).

The engine it is given must not issue BEGIN on SQLAlchemy's ``begin`` event,
and its driver connections run with ``isolation_level = None`` (pysqlite then
begins nothing by itself): SQLAlchemy's transaction on the connection is only
its bookkeeping here, begun once and never committed through SQLAlchemy.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.store.prepared import driver_of, run_sql

T = TypeVar("T")


class SqliteWriter:
    """Run transactions on one kept-open connection; use from one thread only."""

    def __init__(self, engine: sa.Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    def run(self, fn: Callable[[Connection], T]) -> T:
        """``fn`` in one ``BEGIN IMMEDIATE`` transaction, committed when it returns.

        Raises what ``fn`` raised (the transaction rolled back), or the
        driver's error wrapped as SQLAlchemy wraps it (``OperationalError``
        for a locked database or a full disk), as ``engine.begin()`` did.
        """
        conn = self._conn if self._conn is not None else self._open()
        raw = driver_of(conn)
        run_sql(raw, "BEGIN IMMEDIATE")
        try:
            out = fn(conn)
            run_sql(raw, "COMMIT")
        except BaseException:
            self._abandon(conn, raw)
            raise
        return out

    def close(self) -> None:
        """Give the connection back to the engine (which ``dispose`` then closes)."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _open(self) -> Connection:
        conn = self._engine.connect()
        # Begun once, for good: code handed the connection (alembic's
        # ``begin_transaction``) sees a transaction in progress and leaves it
        # to us, instead of committing it through the driver halfway.
        conn.begin()
        self._conn = conn
        return conn

    def _abandon(self, conn: Connection, raw: sqlite3.Connection) -> None:
        """Roll back after a failure; a connection that cannot is dropped, and the
        next transaction opens a new one (the failure itself is the caller's)."""
        if conn.invalidated:
            self._drop()
            return
        if not raw.in_transaction:  # SQLite rolled back already (e.g. SQLITE_FULL)
            return
        try:
            raw.execute("ROLLBACK")
        except sqlite3.Error:
            self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.invalidate()
            conn.close()
