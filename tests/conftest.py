"""Shared fixtures: store URLs for both backends, and a herd on this machine.

``HERDER_REQUIRE_PG=1`` (set by CI) turns a missing PostgreSQL into a
failure instead of a skip.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN_URL = os.environ.get("HERDER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_available() -> bool:
    import asyncpg

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(PG_ADMIN_URL, timeout=3)
        except (OSError, asyncpg.PostgresError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


def _pg_exec(sql: str) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


@pytest.fixture(scope="session")
def pg_ok() -> bool:
    ok = _pg_available()
    if not ok and os.environ.get("HERDER_REQUIRE_PG") == "1":
        pytest.fail(f"PostgreSQL is required (HERDER_REQUIRE_PG=1) but {PG_ADMIN_URL} is down")
    return ok


@pytest.fixture
def pg_url(pg_ok: bool) -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    if not pg_ok:
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} is not reachable")
    name = f"herder_{secrets.token_hex(6)}"
    _pg_exec(f"CREATE DATABASE {name}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    _pg_exec(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'herd.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test modules are not importable on agents: ship their functions by value."""
    import cloudpickle

    for module in {item.module for item in items if isinstance(item, pytest.Function)}:
        if module is not None:
            cloudpickle.register_pickle_by_value(module)
