"""The claims write the state a partial index names into their SQL on SQLite.

``ix_tasks_ready`` holds only ready tasks (``WHERE state = 'ready'``). A
planner uses it only where the query's WHERE implies that; with the state a
bound parameter, SQLite settles it again at every execution by preparing the
statement anew (an empty claim 111 us instead of 27). On PostgreSQL the state
stays bound (herder.store.statements.indexed_state says what was measured).
``test_store``'s plan test checks that the index is used on both.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite

from herder.store.statements import HotStatements

CLAIMS = ("claim_by_key", "ready_head")


def test_sqlite_claims_write_the_ready_state_into_the_sql() -> None:
    hot = HotStatements(is_sqlite=True)
    for name in CLAIMS:
        compiled = getattr(hot, name).compile(dialect=sqlite.dialect())
        assert "tasks.state = 'ready'" in str(compiled), name
        assert "ready" not in compiled.params.values(), f"{name} binds the state"


def test_postgresql_claims_bind_the_ready_state() -> None:
    hot = HotStatements(is_sqlite=False)
    for name in CLAIMS:
        compiled = getattr(hot, name).compile(dialect=postgresql.dialect())
        assert "'ready'" not in str(compiled), name
        assert "ready" in compiled.params.values(), name
