"""A coordinator on SQLite loads only what it uses: every start pays for each import
(issue 11's cold start and memory figures), so the PostgreSQL driver, Alembic, the
ORM and httpx wait until a PostgreSQL store, an upgrade or a tracker needs them.
None of them loads the X.509 library: certificates are made and checked by a
short-lived child (``python -m herder.certs``, herder.tls_setup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

# rich (tables, progress bars), PyYAML (YAML task files) and fsspec (S3) too: 2.8, 0.9
# and 3.8 MB of every coordinator's memory that most never use
NOT_AT_START = (
    "alembic",
    "asyncpg",
    "httpx",
    "sqlalchemy.orm",
    "cryptography",
    "rich",
    "yaml",
    "fsspec",
    "sqlalchemy.dialects.postgresql",
)
AGENT_NOT_AT_START = (
    "httpx",
    "herder.dataclient",
    "sqlalchemy",
    "fastapi",
    "cryptography",
    "rich",
)
# A client and an agent pin a CA by fingerprint and load it into ``ssl``: they never
# make or parse certificates, so the X.509 library (~10 MB, 0.1 s) stays out.
CLIENT_NOT_AT_START = ("cryptography", "sqlalchemy", "fastapi")


def _loaded_after(imports: str, modules: tuple[str, ...], then: str = "") -> str:
    """Which of ``modules`` a fresh interpreter has loaded after ``import <imports>``
    (and the statement ``then``)."""
    probe = (
        f"import sys\nimport {imports}\n{then}\n"
        f"print(sorted(m for m in {modules!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout.strip()


def test_the_coordinators_modules_leave_the_optional_ones_unloaded() -> None:
    imports = (
        "herder.cli, herder.coordinator.app, herder.coordinator.service, herder.store.sql, "
        "herder.tls_setup"
    )
    assert _loaded_after(imports, NOT_AT_START) == "[]"


def test_a_local_datastore_leaves_fsspec_to_s3(tmp_path: Path) -> None:
    made = f"herder.datastore.Datastore('file://{tmp_path}/data')"
    assert _loaded_after("herder.datastore", ("fsspec", "s3fs"), then=made) == "[]"


def test_an_agent_starts_without_httpx() -> None:
    """``herder agent`` (the CLI and the agent's modules) leaves httpx for the first
    task that fetches, uploads or checks a service's health over HTTP: every local
    agent of a cold start paid ~70 ms for it."""
    assert _loaded_after("herder.cli, herder.agent.agent", AGENT_NOT_AT_START) == "[]"


def test_a_client_starts_without_the_x509_library() -> None:
    assert _loaded_after("herder.client, herder.local", CLIENT_NOT_AT_START) == "[]"


def test_a_sqlite_store_is_made_without_the_postgresql_dialect(tmp_path: Path) -> None:
    """Creating the schema (partial indexes included) names no PostgreSQL option."""
    made = (
        "import asyncio\n"
        f"store = herder.store.sql.SqlStore('sqlite:///{tmp_path}/herd.db')\n"
        "asyncio.run(store.open())\n"
        "asyncio.run(store.close())"
    )
    assert _loaded_after("herder.store.sql", NOT_AT_START, then=made) == "[]"
