"""SQLite's hot statements, compiled once and run on the driver.

SQLAlchemy Core spends more on each execution (its execution context,
parameter processing, result wrapping) than SQLite spends running a small
statement: on the store's hot path (submit, lease, start, finish) it was most
of a transaction's CPU (``bench/store_round.py`` runs a round both ways and
by hand, for the floor). So a statement built once
(:class:`~herder.store.statements.HotStatements`) is compiled here once for
SQLite, and each execution goes straight to ``sqlite3``:

- parameters are bound through the very processors SQLAlchemy would use
  (JSON columns encoded, ``None`` as JSON ``null`` where the column says so),
  and the literals a construct carries (``state = 'leased'``) are bound as
  compiled;
- a list parameter (``bindparam("ids", expanding=True)``) goes in as one JSON
  array read by ``json_each``, so a statement has one SQL text whatever the
  list's length and SQLite's statement cache keeps it prepared (the planner
  still probes the primary key for each element);
- rows come back as named tuples, their JSON and Boolean columns decoded as
  SQLAlchemy would.

A driver error is raised as SQLAlchemy would raise it (``OperationalError``
for a locked database or a full disk), so callers handle one kind of error.
PostgreSQL keeps SQLAlchemy's path: asyncpg's codecs and prepared
statements already do this work there.
"""

from __future__ import annotations

import collections
import json
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

_EXPANDED = "(SELECT value FROM json_each(?))"

# One positional parameter: (name, literal, processor, expanding). ``literal`` is
# the compiled value of a bound literal, or _FROM_PARAMS for a parameter the
# caller gives.
_FROM_PARAMS = object()
_Slot = tuple[str, Any, Callable[[Any], Any] | None, bool]


class Prepared:
    """One statement compiled for SQLite's driver; see the module docstring."""

    def __init__(
        self, stmt: sa.ClauseElement, dialect: Dialect, column_keys: Sequence[str] | None = None
    ) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=column_keys)
        assert isinstance(compiled, SQLCompiler)
        sql = compiled.string
        slots: list[_Slot] = []
        for name in compiled.positiontup or ():
            bind = compiled.binds[name]
            process = bind.type._cached_bind_processor(dialect)
            literal: Any = _FROM_PARAMS if bind.required else bind.effective_value
            if bind.expanding:
                if process is not None:
                    raise TypeError(f"{name}: a list of {bind.type} needs per-element encoding")
                sql = sql.replace(f"(__[POSTCOMPILE_{name}])", _EXPANDED, 1)
                if literal is not _FROM_PARAMS:
                    literal = json.dumps(list(literal))
            elif literal is not _FROM_PARAMS and process is not None:
                literal = process(literal)
            slots.append((name, literal, process, bind.expanding))
        if "__[POSTCOMPILE_" in sql:
            raise TypeError(f"a list parameter was not expanded in {sql!r}")
        self.sql = sql
        self._slots = slots
        columns = compiled._result_columns
        self._row: type[tuple[Any, ...]] | None = None
        self._decoders: list[tuple[int, Callable[[Any], Any]]] = []
        if columns:
            self._row = collections.namedtuple("Row", [c[0] for c in columns], rename=True)  # type: ignore[misc]
            for i, column in enumerate(columns):
                decode = column[3]._cached_result_processor(dialect, None)
                if decode is not None:
                    self._decoders.append((i, decode))

    def bind(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters for one execution."""
        out = []
        for name, literal, process, expanding in self._slots:
            if literal is not _FROM_PARAMS:
                out.append(literal)
                continue
            value = params[name]
            if expanding:
                out.append(json.dumps(list(value)))
            else:
                out.append(value if process is None else process(value))
        return tuple(out)

    def rows(self, raw: sqlite3.Connection, params: Mapping[str, Any]) -> list[Any]:
        """Run once; the rows it returns (SELECT, RETURNING), as named tuples."""
        cursor = run_sql(raw, self.sql, self.bind(params))
        if self._row is None:
            return []
        make, decoders = self._row._make, self._decoders  # type: ignore[attr-defined]
        if not decoders:
            return [make(r) for r in cursor.fetchall()]
        out = []
        for r in cursor.fetchall():
            values = list(r)
            for i, decode in decoders:
                values[i] = decode(values[i])
            out.append(make(values))
        return out

    def run(self, raw: sqlite3.Connection, params: Mapping[str, Any]) -> int:
        """Run once; how many rows it changed."""
        return run_sql(raw, self.sql, self.bind(params)).rowcount

    def run_many(self, raw: sqlite3.Connection, params: Iterable[Mapping[str, Any]]) -> None:
        """Run once per parameter set, as one ``executemany``."""
        run_sql_many(raw, self.sql, [self.bind(p) for p in params])


def driver_of(conn: Connection) -> sqlite3.Connection:
    """The pysqlite connection under a SQLAlchemy one (the same transaction)."""
    raw = conn.connection.dbapi_connection
    if not isinstance(raw, sqlite3.Connection):
        raise TypeError(f"expected a pysqlite connection, got {type(raw).__name__}")
    return raw


def run_sql(raw: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
    """Run SQL text on the driver, its errors raised as SQLAlchemy raises them."""
    try:
        return raw.execute(sql, params)
    except sqlite3.Error as exc:
        raise _wrapped(sql, exc) from exc


def run_sql_many(raw: sqlite3.Connection, sql: str, params: Iterable[Sequence[Any]]) -> None:
    """``run_sql`` once per parameter set, as one ``executemany``."""
    try:
        raw.executemany(sql, params)
    except sqlite3.Error as exc:
        raise _wrapped(sql, exc) from exc


def _wrapped(sql: str, exc: sqlite3.Error) -> BaseException:
    """The SQLAlchemy exception for a driver error (``OperationalError`` for "locked")."""
    wrapped = sa.exc.DBAPIError.instance(sql, None, exc, sqlite3.Error)
    return wrapped if isinstance(wrapped, BaseException) else exc
