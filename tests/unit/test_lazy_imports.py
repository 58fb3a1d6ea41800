"""A coordinator on SQLite loads only what it uses: every start pays for each import
(issue 11's cold start and memory figures), so the PostgreSQL driver, Alembic, the
ORM and httpx wait until a PostgreSQL store, an upgrade or a tracker needs them."""

from __future__ import annotations

import subprocess
import sys

NOT_AT_START = ("alembic", "asyncpg", "httpx", "sqlalchemy.orm")


def test_the_coordinators_modules_leave_the_optional_ones_unloaded() -> None:
    probe = (
        "import sys\n"
        "import herder.coordinator.app, herder.coordinator.service, herder.store.sql\n"
        f"print(sorted(m for m in {NOT_AT_START!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout


AGENT_NOT_AT_START = ("httpx", "herder.dataclient", "sqlalchemy", "fastapi")


def test_an_agent_starts_without_httpx() -> None:
    """``herder agent`` (the CLI and the agent's modules) leaves httpx for the first
    task that fetches, uploads or checks a service's health over HTTP: every local
    agent of a cold start paid ~70 ms for it."""
    probe = (
        "import sys\n"
        "import herder.cli, herder.agent.agent\n"
        f"print(sorted(m for m in {AGENT_NOT_AT_START!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
