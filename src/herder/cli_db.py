"""``herder db upgrade|check|vacuum``: the store's schema and housekeeping.

These talk to the store directly (its URL from ``--store``, ``HERDER_STORE``
or ``herder.toml``), not to a coordinator: an upgrade is what makes a
refused store usable again, and it runs before any coordinator can. A
failure prints one line to stderr and exits 1.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from herder.errors import HerderError

if TYPE_CHECKING:
    from herder.store.sql import SqlStore
    from herder.store.vacuum import VacuumReport

T = TypeVar("T")

db_app = typer.Typer(
    help="The store: upgrade or check its schema, vacuum old finished tasks.",
    no_args_is_help=True,
)

HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="HERDER_HOME", help="The herder home directory.")
]
StoreOpt = Annotated[
    str | None,
    typer.Option(envvar="HERDER_STORE", help="Store URL (sqlite:///PATH or postgresql://...)."),
]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _store_url(home: Path | None, store: str | None) -> str:
    from herder.config import load_settings

    env = dict(os.environ)
    if home is not None:
        env["HERDER_HOME"] = str(home)
    return load_settings(env, store_url=store).store_url


def _with_store(url: str, fn: Callable[[SqlStore], Awaitable[T]]) -> T:
    """Run ``fn(store)`` on an unopened SqlStore for ``url``, closing it after."""
    from herder.store.sql import SqlStore

    async def main() -> T:
        store = SqlStore(url)
        try:
            return await fn(store)
        finally:
            await store.close()

    try:
        return asyncio.run(main())
    except HerderError as exc:
        raise _fail(str(exc)) from exc


def parse_age(text: str, option: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` as seconds; a clear error otherwise."""
    match = _AGE.match(text.strip())
    if match is None or float(match[1]) <= 0:
        raise _fail(f"{option} {text!r}: give a number and a unit, like 90s, 30m, 12h or 30d")
    return float(match[1]) * _UNITS[match[2]]


@db_app.command()
def upgrade(home: HomeOpt = None, store: StoreOpt = None) -> None:
    """Migrate the store to this herder's schema (a store from before migrations is stamped)."""
    url = _store_url(home, store)
    done = _with_store(url, lambda s: s.upgrade_schema())
    if done.changed:
        typer.echo(f"store {url}: upgraded from {done.before} to {done.after}")
    else:
        typer.echo(f"store {url}: already at {done.after}")


@db_app.command()
def check(home: HomeOpt = None, store: StoreOpt = None) -> None:
    """Print the store's schema revision and this herder's; exit 1 if they differ."""
    url = _store_url(home, store)
    state = _with_store(url, lambda s: s.schema_state())
    typer.echo(f"store:  {state.describe()}")
    typer.echo(f"herder: {state.code}")
    if not state.is_current:
        raise _fail(state.refusal())


@db_app.command()
def vacuum(
    finished_before: Annotated[
        str,
        typer.Option(
            "--finished-before", help="Age of the tasks to forget: 30d, 12h, 90m (finished then)."
        ),
    ],
    archive: Annotated[
        Path | None,
        typer.Option(help="Append each task (row, edges, attempts) to this JSON-lines file first."),
    ] = None,
    batch: Annotated[int, typer.Option(min=1, help="Tasks per transaction.")] = 1000,
    home: HomeOpt = None,
    store: StoreOpt = None,
) -> None:
    """Delete finished tasks older than the cutoff, in short batches, with their
    attempts and edges; jobs left empty go too. Tasks an unfinished one needs stay."""
    from herder.store.vacuum import MAX_BATCH
    from herder.store.vacuum import vacuum as run_vacuum

    before = time.time() - parse_age(finished_before, "--finished-before")
    if batch > MAX_BATCH:
        raise _fail(f"--batch {batch}: at most {MAX_BATCH}")
    url = _store_url(home, store)

    async def go(s: SqlStore) -> VacuumReport:
        await s.open()
        if archive is None:
            return await run_vacuum(s, before, batch=batch)
        with archive.open("a", encoding="utf-8") as out:
            return await run_vacuum(s, before, batch=batch, archive=out)

    report = _with_store(url, go)
    typer.echo(
        " ".join(f"{k}={v}" for k, v in vars(report).items())
        + f" (finished before {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(before))})"
    )
