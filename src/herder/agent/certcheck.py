"""Tell a refused client certificate from a coordinator that is away.

A coordinator with mutual TLS ends the TLS handshake of a client whose
certificate its CA did not sign. The agent does not learn that from the
failure itself: asyncio drops the TLS alert with the connection, and with
TLS 1.3 the client's side of the handshake is already over, so all it sees
is a connection closed before any answer, as when the coordinator is
restarting. Retrying for ever would hide the mistake, so after such a
failure the agent asks twice: once presenting its certificate, once
without. Answered without and cut with it: the certificate is refused, and
the agent stops with that reason.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import urllib.parse
from pathlib import Path

from herder import security

PROBE_TIMEOUT_S = 5.0


async def certificate_refused(url: str, ca_pem: bytes, cert: Path, key: Path) -> str | None:
    """Why the coordinator at ``url`` refuses this client certificate, or None if it
    does not (or cannot be asked: it is away)."""
    with_cert = security.client_ssl_context(ca_pem, cert, key)
    without = security.client_ssl_context(ca_pem)
    if await asyncio.to_thread(_answers, url, without) is not True:
        return None  # away, or refusing everyone: not this certificate's fault
    if await asyncio.to_thread(_answers, url, with_cert) is not False:
        return None
    return (
        "pairing refused: the coordinator closes every connection that presents this "
        f"node's client certificate ({cert}): it is not signed by the cluster's CA "
        "(herder certs --agent NAME writes one)"
    )


def _answers(url: str, context: ssl.SSLContext) -> bool | None:
    """True: an HTTP answer came back; False: cut during or right after the handshake;
    None: could not connect at all."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    try:
        raw = socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S)
    except OSError:
        return None
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(b"GET /v1/health HTTP/1.1\r\nHost: " + host.encode() + b"\r\n\r\n")
            return bool(tls.recv(16))
    except (ssl.SSLError, ConnectionError):
        return False
    except OSError:
        return None
    finally:
        raw.close()
