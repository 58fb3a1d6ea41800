"""Which schema a store has, and moving it to the one this code knows.

The history lives in :mod:`herder.store.migrations` (Alembic). Everything
here takes a *sync* SQLAlchemy connection already inside the store's write
transaction: :class:`~herder.store.sql.SqlStore` runs it through its own
``_write`` (a pysqlite connection under ``BEGIN IMMEDIATE`` on SQLite, the
asyncpg engine's ``run_sync`` on PostgreSQL). Alembic has no async API of its
own; its cookbook's answer for async engines is the same ``run_sync``, and
sharing the store's transaction means an upgrade, its stamp and the check that
preceded it commit together or not at all (SQLite's DDL is transactional under
an explicit ``BEGIN``; PostgreSQL's always is). On PostgreSQL a transaction
lock serialises coordinators that open or upgrade one store at the same time.

A store made before the history existed carries only ``meta.schema``; it is
*legacy* and ``upgrade`` stamps it with the revision of that number first.

Opening a store that is current, or creating an empty one, does not import
Alembic (about 40 MB and a tenth of a second at every coordinator start): the
head is ``revision_of(schema.SCHEMA_VERSION)`` (a test holds it to the
history's head) and a new store is stamped the way ``alembic stamp`` would.
Alembic is loaded only to upgrade, or to judge a store at another revision.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from herder.errors import SchemaMismatch
from herder.model import new_id
from herder.store import schema

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("herder.store")

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_LOCK = 0x68657264_00000001  # pg_advisory_xact_lock key: "herd", schema changes
# Alembic's own version table, as `alembic stamp` makes it on an empty store.
_VERSION_TABLE = sa.Table(
    "alembic_version",
    sa.MetaData(),
    sa.Column("version_num", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("version_num", name="alembic_version_pkc"),
)


def _config(conn: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def code_revision() -> str:
    """The head of the history shipped with this code (read from the history itself)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS}")
    return head


def revision_of(version: int) -> str:
    """The revision that leaves a store at ``meta.schema`` = ``version``."""
    return f"{version:04d}"


@dataclass(frozen=True)
class SchemaState:
    """What a store holds, next to what this code wants.

    ``url`` is the store's with its password masked (it goes into messages);
    ``store`` is its Alembic revision (None: not stamped); ``legacy`` is
    ``meta.schema`` of a store made before migrations existed (None: not such
    a store); ``known`` is whether ``store`` is in this code's history.
    """

    url: str
    store: str | None
    legacy: int | None
    code: str
    known: bool
    empty: bool

    @property
    def is_current(self) -> bool:
        return self.store == self.code

    @property
    def is_newer(self) -> bool:
        """Made by a newer herder: a revision (or schema number) this code lacks."""
        if self.store is not None:
            return not self.known
        return self.legacy is not None and self.legacy > int(self.code)

    def describe(self) -> str:
        if self.empty:
            return "none (an empty database)"
        if self.store is not None:
            return self.store
        return f"{self.legacy} (meta.schema of a store from before migrations, not stamped)"

    def advice(self) -> str:
        """What the operator should do to make this store usable, or ''."""
        if self.is_current:
            return ""
        if self.empty:
            return (
                f"run `herder db upgrade --store {self.url}` (or start a coordinator) to create it"
            )
        if self.is_newer:
            return "upgrade herder to the version that upgraded this store"
        return f"run `herder db upgrade --store {self.url}`"

    def refusal(self) -> str:
        """Why this code will not use the store, and what to do."""
        newer = "newer than" if self.is_newer else "older than"
        return (
            f"store {self.url} has schema {self.describe()}, {newer} this herder's "
            f"{self.code}: {self.advice()}"
        )


def _in_history(revision: str) -> bool:
    from alembic.script import ScriptDirectory
    from alembic.util.exc import CommandError

    try:
        ScriptDirectory.from_config(_config()).get_revision(revision)
    except CommandError:
        return False
    return True


def read_state(conn: Connection, url: str) -> SchemaState:
    """The schema a store holds, read without changing anything."""
    code = revision_of(schema.SCHEMA_VERSION)
    tables = set(sa.inspect(conn).get_table_names())
    store = None
    if "alembic_version" in tables:  # read directly: alembic's context logs on every open
        versions = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()
        store = next(iter(versions.all()), None)
    legacy = None
    if store is None and "meta" in tables:
        value = conn.execute(
            sa.select(schema.meta.c.value).where(schema.meta.c.key == "schema")
        ).scalar_one_or_none()
        legacy = None if value is None else int(value)
    known = store is None or store == code or _in_history(store)
    empty = store is None and legacy is None and not (tables & set(schema.metadata.tables))
    shown = sa.make_url(url).render_as_string(hide_password=True)
    return SchemaState(shown, store, legacy, code, known, empty)


def _lock(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_LOCK)))


def prepare(conn: Connection, url: str) -> None:
    """On open: create an empty store at the head, or refuse one at another revision.

    Raises :class:`SchemaMismatch` naming the store, both revisions and what to
    run; nothing is changed then.
    """
    _lock(conn)
    state = read_state(conn, url)
    if state.empty:
        _create(conn)
    elif not state.is_current:
        raise SchemaMismatch(state.refusal())
    if (
        conn.execute(sa.select(schema.meta.c.value).where(schema.meta.c.key == "cluster")).first()
        is None
    ):
        conn.execute(schema.meta.insert().values(key="cluster", value=new_id("c")))


def _create(conn: Connection) -> None:
    """A new store is made from the metadata at once and stamped with the head."""
    schema.for_dialect(conn.dialect.name).create_all(conn)
    conn.execute(schema.meta.insert().values(key="schema", value=str(schema.SCHEMA_VERSION)))
    _VERSION_TABLE.create(conn)
    conn.execute(_VERSION_TABLE.insert().values(version_num=revision_of(schema.SCHEMA_VERSION)))


@dataclass(frozen=True)
class Upgraded:
    """The outcome of :func:`upgrade`: the store's schema before and after."""

    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def upgrade(conn: Connection, url: str) -> Upgraded:
    """Bring a store to this code's head (stamping a legacy store first).

    A store from a newer herder is refused with :class:`SchemaMismatch`.
    """
    _lock(conn)
    state = read_state(conn, url)
    if state.is_newer:
        raise SchemaMismatch(state.refusal())
    if state.empty:
        _create(conn)
        return Upgraded("empty", state.code)
    if state.store is None:
        if state.legacy is None:
            raise SchemaMismatch(
                f"store {url} holds herder tables but neither meta.schema nor "
                "alembic_version: it is not a store this herder made"
            )
        _stamp_legacy(conn, state.legacy)
    if not state.is_current:
        from alembic import command

        command.upgrade(_config(conn), "head")
        log.info("store %s upgraded from %s to %s", url, state.describe(), state.code)
    return Upgraded(state.describe(), state.code)


def _stamp_legacy(conn: Connection, version: int) -> None:
    """Stamp a store from before migrations with the revision of its schema number.

    A schema-3 store made before ``ix_tasks_service`` existed (the index came
    later under the same number; the code of the day made it on open) gets
    it here, so that the store then matches revision 0003 exactly.
    """
    from alembic import command

    command.stamp(_config(conn), revision_of(version))
    have = {ix["name"] for ix in sa.inspect(conn).get_indexes("tasks")}
    if version >= 3 and "ix_tasks_service" not in have:
        index = schema.tasks.indexes
        (service,) = [ix for ix in index if ix.name == "ix_tasks_service"]
        service.create(conn)


def run_revisions(conn: Connection, target: str) -> None:
    """Run the history itself from what the store holds up to ``target`` (a revision
    or "head"): for tests and tools that need a store as an older herder left it."""
    from alembic import command

    command.upgrade(_config(conn), target)
