"""``herder data put|get|ls|rm|cat``: the datastore from the command line.

Each command talks to the coordinator found the usual way (``--home`` /
``HERDER_HOME``, ``HERDER_URL`` / ``HERDER_TOKEN``) through a
:class:`~herder.datastore.DataClient`. A failure prints one line to stderr
and exits with status 1.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from herder.errors import HerderError

if TYPE_CHECKING:  # imported lazily: keeps `herder --help` light
    from herder.dataclient import DataClient

T = TypeVar("T")

data_app = typer.Typer(
    help="Put, get, list and remove objects in the datastore.", no_args_is_help=True
)

HomeOpt = Annotated[
    Path | None, typer.Option("--home", envvar="HERDER_HOME", help="The herder home directory.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


@contextmanager
def _data(home: Path | None) -> Iterator[DataClient]:
    """A DataClient for the coordinator this home (or the environment) names."""
    from herder import security
    from herder.client import resolve_target
    from herder.dataclient import DataClient

    env = dict(os.environ)
    if home is not None:
        env["HERDER_HOME"] = str(home)
    try:
        url, token = resolve_target(None, None, env)
        ca = security.fetch_pinned_ca(url, token.fingerprint)
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot reach the coordinator: {exc}") from exc
    with DataClient(url, token.without_url().encode(), ca) as client:
        yield client


def _run(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except HerderError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


@data_app.command("put")
def put(
    local: Annotated[Path, typer.Argument(help="The local file to upload.")],
    key: Annotated[str, typer.Argument(help="The datastore key to store it under.")],
    home: HomeOpt = None,
) -> None:
    """Upload LOCAL to KEY (streamed; replaces any object under KEY)."""
    with _data(home) as data:
        info = _run(lambda: data.put_file(key, local))
    typer.echo(f"put {info.key} ({_size(info.size)}, sha256 {info.sha256[:16]})")


@data_app.command("get")
def get(
    key: Annotated[str, typer.Argument(help="The datastore key to fetch.")],
    local: Annotated[
        str | None,
        typer.Argument(help="Where to write it; '-' for stdout; default: the key's last part."),
    ] = None,
    home: HomeOpt = None,
) -> None:
    """Download KEY, verified against its sha256; a corrupt object leaves no file."""
    with _data(home) as data:
        if local == "-":
            out = sys.stdout.buffer
            _run(lambda: data.write_to(key, out))
            out.flush()
            return
        target = Path(local) if local else Path(key.rsplit("/", 1)[-1])
        info = _run(lambda: data.get_file(key, target))
    typer.echo(f"got {info.key} -> {target} ({_size(info.size)})", err=True)


@data_app.command("cat")
def cat(
    key: Annotated[str, typer.Argument(help="The datastore key to print.")],
    home: HomeOpt = None,
) -> None:
    """Print KEY's bytes to stdout; nothing is printed unless the whole object is verified."""
    with _data(home) as data:
        content = _run(lambda: data.cat(key))
    sys.stdout.buffer.write(content)
    sys.stdout.buffer.flush()


@data_app.command("ls")
def ls(
    prefix: Annotated[str, typer.Argument(help="List keys starting with this.")] = "",
    home: HomeOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List objects whose key starts with PREFIX."""
    with _data(home) as data:
        found = _run(lambda: data.ls(prefix))
    if as_json:
        typer.echo(json.dumps([i.to_json() for i in found], indent=2))
        return
    for info in found:
        when = datetime.datetime.fromtimestamp(info.modified).strftime("%Y-%m-%d %H:%M:%S")
        typer.echo(f"{_size(info.size):>10}  {when}  {info.sha256[:12]}  {info.key}")


@data_app.command("rm")
def rm(
    key: Annotated[str, typer.Argument(help="The datastore key to remove.")],
    home: HomeOpt = None,
) -> None:
    """Remove the object under KEY."""
    with _data(home) as data:
        _run(lambda: data.rm(key))
    typer.echo(f"removed {key}")
