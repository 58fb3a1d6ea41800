"""``herder data put|get|ls|rm|cat``: the datastore from the command line."""

from __future__ import annotations

import typer

data_app = typer.Typer(
    help="Put, get, list and remove objects in the datastore.", no_args_is_help=True
)
