"""An ``agent`` token pairs a node without the cluster secret: the handshake proves
knowledge of a key derived from the token on both sides, never sends it, and cannot
be replayed; the token opens no REST route beyond the datastore; revoking it closes
the node's session at once and refuses its next pairing."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from herder import protocol, security
from herder.client import Client
from herder.local import LocalHerd
from tests.helpers import herder, kill_tree, wait_for


@pytest.fixture(scope="module")
def site() -> Iterator[tuple[LocalHerd, Client]]:
    h = LocalHerd(nodes=0, extra_args=["--no-beacon"])
    client = h.start()
    try:
        yield h, client
    finally:
        h.stop()


def _token(h: LocalHerd, role: str = "agent") -> security.ApiToken:
    text = herder(h.env(), "token", "create", "--role", role, "--name", f"test {role}").stdout
    return security.ApiToken.parse(text.strip())


def _agent_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}


def _agent(token: str, node_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "herder", "agent", "--join", token, "--node-id", node_id,
         "--orphan-after", "20"],
        env=_agent_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip


def _node_state(client: Client, node_id: str) -> str | None:
    return next((n["state"] for n in client.nodes() if n["id"] == node_id), None)


def test_an_agent_token_pairs_a_node_that_runs_tasks(site: tuple[LocalHerd, Client]) -> None:
    h, client = site
    token = _token(h)
    agent = _agent(token.encode(), "n-token-a")
    try:
        wait_for(lambda: _node_state(client, "n-token-a") == "ready", 60, "the node to pair")
        assert client.command(["echo", "hi"]).result(timeout=60)["stdout_tail"] == "hi\n"
        # a secret variable, sealed under the cluster secret in the store, is sealed
        # again for the token's node, which opens it without the cluster secret
        run = client.command(
            ["sh", "-c", 'test "$PASSWORD" = s3cret && echo ok'],
            env={"PASSWORD": "s3cret"},
            secret_env=["PASSWORD"],
        )
        assert run.result(timeout=60)["stdout_tail"] == "ok\n"
    finally:
        kill_tree(agent.pid)
        agent.communicate(timeout=30)


def test_an_agent_token_opens_only_the_datastore(site: tuple[LocalHerd, Client]) -> None:
    h, _ = site
    token = _token(h)
    headers = {"authorization": f"Bearer {token.encode()}"}
    with httpx.Client(base_url=h.url, verify=False, headers=headers, timeout=30) as http:
        before = http.get("/v1/data").status_code
        assert http.put("/v1/data/agent-token/x", content=b"x").status_code in (200, 201, 204)
        assert before == 200
        for method, path, body in [
            ("GET", "/v1/status", None),
            ("GET", "/v1/nodes", None),
            ("GET", "/v1/tokens", None),
            ("POST", "/v1/tasks", {"job_id": "j-x", "tasks": [{"command": {"run": ["true"]}}]}),
            ("POST", "/v1/tokens", {"role": "admin"}),
            ("POST", "/v1/shutdown", {}),
        ]:
            answer = http.request(method, path, json=body)
            assert answer.status_code == 403, (method, path, answer.status_code)


def test_other_roles_and_forged_agent_tokens_cannot_pair(site: tuple[LocalHerd, Client]) -> None:
    h, client = site
    before = {n["id"] for n in client.nodes()}
    read = _token(h, "read")
    real = _token(h)
    forged = security.ApiToken(real.id, os.urandom(32), real.fingerprint, real.url)
    for text, reason in [
        (read.encode(), "not an agent token"),
        (forged.encode(), "could not prove it knows the secret"),
    ]:
        agent = _agent(text, "n-rogue")
        out, _ = agent.communicate(timeout=60)
        assert agent.returncode == 1, out
        assert reason in out
        assert forged.secret.hex() not in out
    assert {n["id"] for n in client.nodes()} == before  # no node was added


def test_revoking_the_token_closes_the_session_and_refuses_the_next_pairing(
    site: tuple[LocalHerd, Client],
) -> None:
    h, client = site
    token = _token(h)
    agent = _agent(token.encode(), "n-token-r")
    try:
        wait_for(lambda: _node_state(client, "n-token-r") == "ready", 60, "the node to pair")
        revoked_at = time.monotonic()
        herder(h.env(), "token", "revoke", token.id)
        out, _ = agent.communicate(timeout=60)  # closed at once, and refused when it retries
        assert time.monotonic() - revoked_at < 30
    finally:
        kill_tree(agent.pid)
    assert agent.returncode == 1, out
    assert f"token {token.id} was revoked" in out
    again = _agent(token.encode(), "n-token-r2")
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 1
    assert "was revoked" in out
    assert _node_state(client, "n-token-r2") is None


async def _hello_then(
    url: str, ca: bytes, token: security.ApiToken, nonce: bytes, proof: bytes | None
) -> tuple[protocol.Challenge, Any]:
    """One pairing attempt by hand: send a hello with ``nonce``, read the challenge,
    answer with ``proof`` (None: the right one for this challenge); the answer."""
    ws_url = "wss://" + url.split("://", 1)[1] + "/v1/agent"
    context = security.client_ssl_context(ca)
    async with websockets.connect(ws_url, ssl=context) as ws:
        hello = protocol.Hello(
            node_id="n-by-hand", name="by hand", slots=1, prefetch=0,
            nonce=nonce, token_id=token.id,
        )  # fmt: skip
        sent = protocol.encode(hello)
        assert token.secret not in sent
        await ws.send(sent)
        (challenge,) = protocol.decode_coordinator(await ws.recv())
        assert isinstance(challenge, protocol.Challenge)
        key = security.pairing_key(token.secret, token.id)
        assert challenge.mac == security.coordinator_proof(key, nonce, challenge.nonce)
        mac = proof or security.agent_proof(key, challenge.nonce, nonce)
        await ws.send(protocol.encode(protocol.Proof(mac=mac)))
        try:
            (answer,) = protocol.decode_coordinator(await ws.recv())
        except websockets.ConnectionClosed as exc:
            answer = exc
        return challenge, answer


def test_a_recorded_handshake_cannot_be_replayed(site: tuple[LocalHerd, Client]) -> None:
    h, _ = site
    token = _token(h)
    ca = security.fetch_pinned_ca(h.url, token.fingerprint)
    nonce = security.new_nonce()
    first, welcome = asyncio.run(_hello_then(h.url, ca, token, nonce, None))
    assert isinstance(welcome, protocol.Welcome)
    recorded = security.agent_proof(
        security.pairing_key(token.secret, token.id), first.nonce, nonce
    )
    second, refused = asyncio.run(_hello_then(h.url, ca, token, nonce, recorded))
    assert second.nonce != first.nonce  # a fresh challenge: the old proof answers nothing
    assert isinstance(refused, protocol.Refuse)
    assert refused.reason == "authentication failed"
