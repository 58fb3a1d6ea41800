"""The hot claim statements write the state a partial index names into their SQL.

``ix_tasks_ready`` holds only ready tasks (``WHERE state = 'ready'``). A
planner uses it only where the query's WHERE implies that; with the state a
bound parameter, SQLite settles it again at every execution by preparing the
statement anew (an empty claim 111 us instead of 27), and PostgreSQL's generic
plan cannot use the index at all. ``test_store``'s plan test checks that the
index is used; this one that nothing binds the state.
"""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect

from herder.store.statements import HotStatements


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "pg"])
def test_claims_write_the_ready_state_into_the_sql(dialect: Dialect) -> None:
    hot = HotStatements(is_sqlite=dialect.name == "sqlite")
    for name in ("claim_by_key", "ready_head"):
        compiled = getattr(hot, name).compile(dialect=dialect)
        assert "tasks.state = 'ready'" in str(compiled), name
        assert "ready" not in compiled.params.values(), f"{name} binds the state"
