"""``herder certs``: a CA and certificates for sites that hold their own PKI.

Writes into one directory (see :mod:`herder.certs`); the coordinator then
serves with ``herder up --tls-cert DIR/server.pem --tls-key DIR/server.key
--tls-ca DIR/ca.pem`` and, with ``--agent-mtls``, pairs only with agents that
present one of the agent certificates (``herder agent --tls-cert
DIR/agent-NAME.pem --tls-key DIR/agent-NAME.key``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from herder.errors import HerderError
from herder.terminal import stderr_console, stdout_console


def certs_command(
    directory: Annotated[
        Path, typer.Argument(help="Where to write them (the CA there is kept if present).")
    ],
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host",
            help="A name or address the coordinator is reached at: writes server.pem "
            "with these as its names (repeat).",
        ),
    ] = None,
    agent: Annotated[
        list[str] | None,
        typer.Option("--agent", help="A node name: writes agent-NAME.pem and .key (repeat)."),
    ] = None,
) -> None:
    """Write a CA (key 0600), a server certificate and agent client certificates."""
    from herder.certs import issue_agent, issue_server, write_ca
    from herder.security import ca_fingerprint, fingerprint_hex

    try:
        ca_cert, ca_key = write_ca(directory)
        written = [ca_cert, ca_key]
        if host:
            written += issue_server(directory, host)
        for name in agent or []:
            written += issue_agent(directory, name)
    except HerderError as exc:
        stderr_console().print(f"herder certs: {exc}", style="red", highlight=False)
        raise typer.Exit(1) from exc
    for path in written:
        print(path)
    fingerprint = fingerprint_hex(ca_fingerprint(ca_cert.read_bytes()))
    stdout_console().print(f"CA fingerprint {fingerprint}.. (join tokens pin it)", highlight=False)
