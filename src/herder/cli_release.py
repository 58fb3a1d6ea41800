"""``herder release create|ls|show|rm|roll|status``: releases from the command line.

A release is built here, where the files are, uploaded to the datastore
through the coordinator and registered there; nodes install it when a task
(or the fleet) needs it. A failure prints one line to stderr and exits 1.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from herder.errors import HerderError
from herder.terminal import new_table, stdout_console

if TYPE_CHECKING:
    from herder.client import Client

T = TypeVar("T")

release_app = typer.Typer(
    help="Build, list, remove and roll out releases (code and its dependencies).",
    no_args_is_help=True,
)

HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="HERDER_HOME", help="The herder home directory.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
IdArg = Annotated[str, typer.Argument(help="Release id (r-…).")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextmanager
def connected(home: Path | None) -> Iterator[Client]:
    """A client of the coordinator this home (or the environment) names; a failure to
    reach it is one line on stderr and exit status 1 (also for herder.cli_query)."""
    from herder.client import connect

    env = dict(os.environ)
    if home is not None:
        env["HERDER_HOME"] = str(home)
    try:
        with connect(env=env) as herd:
            yield herd
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot reach the coordinator: {exc}") from exc


def _run(home: Path | None, action: Callable[[Client], T]) -> T:
    with connected(home) as herd:
        return action(herd)


@release_app.command("create")
def create(
    path: Annotated[
        Path | None, typer.Argument(help="The project directory (honours .gitignore).")
    ] = None,
    requirements: Annotated[
        Path | None, typer.Option("--requirements", "-r", help="A requirements.txt to install.")
    ] = None,
    require: Annotated[
        list[str] | None, typer.Option(help="A requirement (repeat), e.g. 'numpy>=2'.")
    ] = None,
    python: Annotated[
        str | None, typer.Option(help="Python major.minor (default: this one's).")
    ] = None,
    exclude: Annotated[
        list[str] | None, typer.Option(help="A gitignore-style pattern to leave out (repeat).")
    ] = None,
    git: Annotated[str | None, typer.Option(help="Build from this git repository …")] = None,
    rev: Annotated[str | None, typer.Option(help="… at this revision.")] = None,
    wheel: Annotated[Path | None, typer.Option(help="Build from this wheel.")] = None,
    find_links: Annotated[
        list[str] | None,
        typer.Option(help="A wheelhouse: a directory (bundled) or a URL (repeat)."),
    ] = None,
    no_index: Annotated[
        bool, typer.Option(help="Install from --find-links only (offline nodes).")
    ] = False,
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Build a release and store it; prints its id (the same input gives the same id)."""

    def build(herd: Client) -> str:
        return herd.release(
            path,
            requirements=require or (),
            requirements_file=requirements,
            python=python,
            exclude=exclude or (),
            find_links=find_links or (),
            no_index=no_index,
            git=git,
            rev=rev,
            wheel=wheel,
        )

    release_id = _run(home, build)
    if as_json:
        typer.echo(json.dumps({"id": release_id}))
    else:
        typer.echo(release_id)


@release_app.command("ls")
def list_releases(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Every release, newest first (* marks the fleet's)."""
    releases = _run(home, lambda herd: herd.releases())
    if as_json:
        typer.echo(json.dumps(releases, indent=2))
        return
    table = new_table()
    for column in ("id", "kind", "files", "size", "created"):
        table.add_column(column, no_wrap=True)
    table.add_column("source", overflow="fold")
    table.add_column("requirements", overflow="fold")
    for r in releases:
        table.add_row(
            r["id"] + (" *" if r["fleet"] else ""),
            r["kind"],
            str(r["files"]),
            _size(r["size"]),
            _when(r["created_at"]),
            r["source"],
            ", ".join(r["requirements"]) or "-",
        )
    stdout_console().print(table)


@release_app.command("show")
def show(release_id: IdArg, home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """A release's manifest, what uses it, and the nodes that have it installed."""
    info = _run(home, lambda herd: herd.release_info(release_id))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    for key in ("id", "kind", "source", "python", "requirements", "find_links", "no_index"):
        typer.echo(f"{key:13} {_text(info[key])}")
    typer.echo(f"{'files':13} {info['files']} ({_size(info['size'])})")
    typer.echo(f"{'sha256':13} {info['sha256']}")
    typer.echo(f"{'created':13} {_when(info['created_at'])}")
    typer.echo(f"{'fleet':13} {'yes' if info['fleet'] else 'no'}")
    users = {k: v for k, v in info["users"].items() if k != "fleet"}
    typer.echo(f"{'tasks':13} {_text(users) if users else 'none unfinished'}")
    typer.echo(f"{'installed on':13} {', '.join(info['nodes']) or 'no connected node'}")


@release_app.command("rm")
def remove(release_id: IdArg, home: HomeOpt = None) -> None:
    """Delete a release (refused while unfinished tasks or the fleet use it)."""
    _run(home, lambda herd: herd.remove_release(release_id))
    typer.echo(f"removed {release_id}")


@release_app.command("roll")
def roll(release_id: IdArg, home: HomeOpt = None) -> None:
    """Make RELEASE the fleet's: nodes load it now, new tasks run in it, running ones
    finish in the release they started in."""
    _run(home, lambda herd: herd.roll(release_id))
    typer.echo(f"rolling out {release_id}: `herder release status` shows the nodes")


@release_app.command("status")
def status(home: HomeOpt = None, as_json: JsonOpt = False) -> None:
    """Per node: the releases installed and those loading."""
    state = _run(home, lambda herd: herd.release_status())
    if as_json:
        typer.echo(json.dumps(state, indent=2))
        return
    fleet = state["fleet_release"]
    typer.echo(f"fleet release: {fleet or 'none'}")
    table = new_table()
    table.add_column("node", no_wrap=True)
    table.add_column("fleet release", no_wrap=True)
    table.add_column("installed", overflow="fold")
    table.add_column("loading", overflow="fold")
    for node in state["nodes"]:
        ready = "-" if fleet is None else ("ready" if node["fleet_release_ready"] else "not yet")
        table.add_row(
            node["node"],
            ready,
            ", ".join(node["installed"]) or "-",
            ", ".join(node["loading"]) or "-",
        )
    stdout_console().print(table)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _when(at: float) -> str:
    return datetime.datetime.fromtimestamp(at).strftime("%Y-%m-%d %H:%M:%S")


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
