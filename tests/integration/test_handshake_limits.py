"""Before a request: a TLS handshake has a short deadline, a connection counts against
its source from the moment it is accepted, and refused pairings write a bounded number
of events however many there are."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from herder import protocol, security
from herder.client import Client
from herder.local import LocalHerd
from tests.helpers import db_rows, herder

HANDSHAKE_S = 1.5
PER_SOURCE = 20
BAD_PAIRINGS = int(os.environ.get("HERDER_TEST_BAD_PAIRINGS", "1000"))


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalHerd, Client]]:
    home = tmp_path_factory.mktemp("home")
    (home / "herder.toml").write_text(f"[coordinator]\ntls_handshake_s = {HANDSHAKE_S}\n")
    env = {**os.environ, "HERDER_MAX_CONNECTIONS_PER_SOURCE": str(PER_SOURCE)}
    h = LocalHerd(nodes=0, home=home, env=env, extra_args=["--no-beacon"])
    client = h.start()
    try:
        yield h, client
    finally:
        h.stop()


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    return host, int(port)


def _silent(url: str, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection that never sends a ClientHello."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(30)
    sock.connect(_address(url))
    return sock


def _cut_after(sock: socket.socket, within: float) -> float | None:
    """Seconds until the peer closed ``sock``, or None if it did not within ``within``."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        sock.recv(1)
    except ConnectionError:
        pass
    except TimeoutError:
        return None
    return time.monotonic() - started


def _status(h: LocalHerd, client: Client) -> int:
    headers = {"authorization": client.aio.http.headers["authorization"]}
    return httpx.get(f"{h.url}/v1/status", headers=headers, verify=False, timeout=30).status_code


def test_a_client_that_never_says_hello_is_cut_within_the_deadline(
    site: tuple[LocalHerd, Client],
) -> None:
    h, _ = site
    with _silent(h.url) as sock:
        waited = _cut_after(sock, HANDSHAKE_S + 5)
    assert waited is not None, "a silent connection outlived the handshake deadline"
    assert HANDSHAKE_S * 0.5 < waited < HANDSHAKE_S + 5


def test_connections_count_against_their_source_before_the_handshake(
    site: tuple[LocalHerd, Client],
) -> None:
    h, client = site
    source = "127.0.0.2"  # another source than the client's, which keeps being served
    held = [_silent(h.url, source) for _ in range(PER_SOURCE)]
    try:
        time.sleep(0.2)
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        with _silent(h.url, source) as extra, pytest.raises((ssl.SSLError, ConnectionError)):
            context.wrap_socket(extra).do_handshake()  # refused at accept
        assert _status(h, client) == 200
        for sock in held:  # and each is cut at its deadline, giving the share back
            assert _cut_after(sock, HANDSHAKE_S + 5) is not None
    finally:
        for sock in held:
            sock.close()
    with _silent(h.url, source) as again:
        wrapped = context.wrap_socket(again)
        wrapped.do_handshake()
        wrapped.close()


async def _bad_pairings(url: str, ca: bytes, count: int, concurrency: int = 8) -> int:
    """``count`` pairings with the wrong secret; how many were refused."""
    ws_url = "wss://" + url.split("://", 1)[1] + "/v1/agent"
    context = security.client_ssl_context(ca)
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bool:
        async with gate, websockets.connect(ws_url, ssl=context, open_timeout=30) as ws:
            hello = protocol.Hello(
                node_id=f"n-bad-{i}", name="bad", slots=1, prefetch=0, nonce=security.new_nonce()
            )
            await ws.send(protocol.encode(hello))
            (challenge,) = protocol.decode_coordinator(await ws.recv())
            assert isinstance(challenge, protocol.Challenge)
            await ws.send(protocol.encode(protocol.Proof(mac=os.urandom(32))))
            (answer,) = protocol.decode_coordinator(await ws.recv())
            return isinstance(answer, protocol.Refuse)

    done = await asyncio.gather(*(one(i) for i in range(count)))
    return sum(done)


def test_many_refused_pairings_write_a_bounded_number_of_events(
    site: tuple[LocalHerd, Client],
) -> None:
    h, client = site
    token = security.JoinToken.parse(herder(h.env(), "token").stdout.strip())
    ca = security.fetch_pinned_ca(h.url, token.fingerprint)
    started = time.monotonic()
    refused = asyncio.run(_bad_pairings(h.url, ca, BAD_PAIRINGS))
    took = time.monotonic() - started
    assert refused == BAD_PAIRINGS
    rows = db_rows(Path(h.home), "SELECT data FROM events WHERE action = 'pairing_refused'")
    # one per source per minute (all come from 127.0.0.1): bounded by the time taken
    assert 1 <= len(rows) <= 1 + int(took // 60) + 1
    assert not client.nodes()
