"""Every route refuses every kind of bad credential and changes nothing; roles allow what
they should and no more; revocation is immediate (open WebSockets too); foreign Host and
Origin headers are refused; failed authentication is rate-limited per source."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sqlite3
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from herder import security
from herder.coordinator.auth import RULES
from herder.local import LocalHerd

CREDENTIALS = ("none", "forged join token", "forged API token", "expired", "revoked", "wrong role")


class Site:
    def __init__(self, herd: LocalHerd) -> None:
        self.herd = herd
        assert herd.client is not None
        self.client = herd.client
        self.admin = self.client.aio.http.headers["authorization"].split(" ", 1)[1]
        self.url = herd.url

    def token(self, role: str, ttl_s: float | None = None) -> str:
        made: str = self.client.create_token(role, name=f"test {role}", ttl_s=ttl_s)["token"]
        return made

    def call(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        headers.update(kwargs.pop("headers", {}))
        return httpx.request(
            method, self.url + path, headers=headers, verify=False, timeout=30, **kwargs
        )


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    # every request here comes from 127.0.0.1: the limit on failures is tested on its own
    herd = LocalHerd(nodes=1, env={**os.environ, "HERDER_MAX_AUTH_FAILURES": "100000"})
    herd.start()
    try:
        herd.wait_nodes(1)
        yield Site(herd)
    finally:
        herd.stop()


def store_state(home: Path) -> str:
    """A digest of everything a refused request must not change (telemetry, node
    heartbeats and the event log's node lines move by themselves and are left out)."""
    db = sqlite3.connect(home / "herd.db")
    try:
        parts = []
        for table in ("tasks", "jobs", "deps", "attempts", "tokens", "meta"):
            rows = db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
            parts.append(repr(rows))
        parts.append(repr(sorted(p.relative_to(home) for p in (home / "data").rglob("*"))))
    finally:
        db.close()
    return hashlib.sha256("".join(parts).encode()).hexdigest()


def concrete(path: str) -> str:
    """A path template with its parameters filled in (a data key holds a slash)."""
    return (
        path.replace("{key}", "some/key.txt")
        .replace("{task_id}", "t-missing")
        .replace("{job_id}", "j-missing")
        .replace("{node_id}", "n-missing")
        .replace("{release_id}", "r-0123456789abcdef0123")
        .replace("{token_id}", "k-0123456789abcdef")
        .replace("{name}", "app.js")
    )


def bodies(method: str, path: str) -> dict[str, Any]:
    """A plausible body, so a refusal is the credential's and not the body's."""
    if path == "/v1/tasks" and method == "POST":
        spec = {"id": "t-intruder", "kind": "command", "command": {"run": ["true"]}}
        return {"json": {"job_id": "j-intruder", "tasks": [spec]}}
    if path == "/v1/cancel":
        return {"json": {"job_id": "j-any"}}
    if path == "/v1/fleet/scale":
        return {"json": {"target": 0}}
    if path == "/v1/tokens" and method == "POST":
        return {"json": {"role": "admin"}}
    if method == "PUT":
        return {"content": b"intruder"}
    if path == "/v1/push":
        return {"params": {"format": "toml", "source": "x.toml", "job_id": "j-x"}, "content": b""}
    return {}


GRANTS = {"agent": {"agent"}, "read": {"read"}, "submit": {"read", "submit"}}


def test_every_route_refuses_every_bad_credential_and_changes_nothing(site: Site) -> None:
    spec = site.call("GET", "/openapi.json", site.admin).json()
    routes = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    ]
    assert len(routes) >= 40  # the whole API, not a sample
    protected = [r for r in routes if "public" not in RULES.get(r, frozenset({"admin"}))]
    roles = {role: site.token(role) for role in GRANTS}
    expired = site.token("admin", ttl_s=0.5)
    revoked = site.token("admin")
    site.client.revoke_token(security.ApiToken.parse(revoked).id)
    time.sleep(0.6)
    common = {
        "none": None,
        "forged join token": security.JoinToken(secrets.token_bytes(32), bytes(32)).encode(),
        "forged API token": security.ApiToken.new(bytes(32)).encode(),
        "expired": expired,
        "revoked": revoked,
    }
    before = store_state(site.herd.home)
    tried = 0
    for method, path in protected:
        needed = RULES.get((method, path), frozenset({"admin"}))
        # the role with the most rights that still lacks this route's, if there is one
        weaker = [r for r in ("submit", "read", "agent") if not GRANTS[r] & needed]
        kinds = {**common, **({"wrong role": roles[weaker[0]]} if weaker else {})}
        for kind, token in kinds.items():
            answer = site.call(method, concrete(path), token, **bodies(method, path))
            assert answer.status_code in (401, 403), (method, path, kind, answer.text)
            tried += 1
    assert store_state(site.herd.home) == before
    assert tried >= len(protected) * (len(CREDENTIALS) - 1)
    print(f"{len(protected)} protected routes x up to {len(CREDENTIALS)} kinds: {tried} refused")


def test_every_route_has_a_rule(site: Site) -> None:
    spec = site.call("GET", "/openapi.json", site.admin).json()
    unlisted = [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if (method.upper(), path) not in RULES and path not in ("/v1/announce", "/v1/hosts")
    ]
    assert unlisted == []


def test_roles_allow_what_they_should_and_no_more(site: Site) -> None:
    read, submit, agent = site.token("read"), site.token("submit"), site.token("agent")
    assert site.call("GET", "/v1/status", read).status_code == 200
    assert site.call("GET", "/metrics", read).status_code == 200
    assert site.call("POST", "/v1/tasks", read, **bodies("POST", "/v1/tasks")).status_code == 403
    assert site.call("GET", "/v1/status", agent).status_code == 403
    assert site.call("PUT", "/v1/data/agent/out.txt", agent, content=b"ok").status_code == 201
    assert site.call("GET", "/v1/data/agent/out.txt", agent).content == b"ok"
    # a submitter submits and cancels its own job, not another's; it cannot run the herd
    mine = {"job_id": "j-mine", "tasks": [{"id": "t-mine", "kind": "command",
            "command": {"run": ["sleep", "30"]}}]}  # fmt: skip
    assert site.call("POST", "/v1/tasks", submit, json=mine).status_code == 200
    theirs = site.client.command(["sleep", "30"], job="j-theirs")
    assert site.call("POST", "/v1/cancel", submit, json={"job_id": "j-theirs"}).status_code == 403
    assert (
        site.call("POST", "/v1/cancel", submit, json={"task_ids": [theirs.task_id]}).status_code
        == 403
    )
    assert site.call("POST", "/v1/cancel", submit, json={"job_id": "j-mine"}).json() == {
        "cancelled": ["t-mine"]
    }
    assert site.call("POST", "/v1/fleet/scale", submit, json={"target": 0}).status_code == 403
    assert site.call("GET", "/v1/tokens", submit).status_code == 403
    site.client.cancel(theirs)
    # an admin API token is an admin
    admin = site.token("admin")
    assert site.call("GET", "/v1/tokens", admin).status_code == 200


def test_tokens_are_stored_hashed_and_listed_without_secrets(site: Site) -> None:
    text = site.token("read")
    token = security.ApiToken.parse(text)
    listed = {t["id"]: t for t in site.client.tokens()}
    assert listed[token.id]["role"] == "read"
    assert "digest" not in listed[token.id]
    assert text not in json.dumps(listed)
    db = sqlite3.connect(site.herd.home / "herd.db")
    try:
        (digest,) = db.execute("SELECT digest FROM tokens WHERE id = ?", (token.id,)).fetchone()
    finally:
        db.close()
    assert digest == hashlib.sha256(token.secret).hexdigest()
    raw = (site.herd.home / "herd.db").read_bytes()
    assert token.secret not in raw


def test_revocation_takes_effect_at_once_also_for_open_websockets(site: Site) -> None:
    token = site.token("read")
    token_id = security.ApiToken.parse(token).id
    url = "wss://" + site.url.split("://", 1)[1] + "/v1/live"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def watch() -> int | None:
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send(json.dumps({"token": token}))
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"
            await asyncio.to_thread(site.client.revoke_token, token_id)
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None

    assert asyncio.run(watch()) == 4401
    assert site.call("GET", "/v1/status", token).status_code == 401


def test_foreign_host_and_origin_are_refused(site: Site) -> None:
    assert site.call("GET", "/v1/status", site.admin).status_code == 200
    rebound = site.call("GET", "/v1/status", site.admin, headers={"host": "evil.example"})
    assert rebound.status_code == 403
    assert "Host" in rebound.json()["detail"]
    cross = site.call(
        "POST", "/v1/shutdown", site.admin, headers={"origin": "https://evil.example"}
    )
    assert cross.status_code == 403
    same = site.call("GET", "/v1/status", site.admin, headers={"origin": site.url})
    assert same.status_code == 200
    url = "wss://" + site.url.split("://", 1)[1] + "/v1/live"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def cross_site_socket() -> int | None:
        try:
            async with websockets.connect(
                url, ssl=context, additional_headers={"Origin": "https://evil.example"}
            ) as ws:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        except websockets.InvalidStatus as refused:
            return refused.response.status_code
        return None

    assert asyncio.run(cross_site_socket()) in (403, 4403)


def test_failed_authentication_is_rate_limited_per_source(tmp_path: Path) -> None:
    herd = LocalHerd(nodes=0, home=tmp_path / "home")
    herd.start()
    try:
        site = Site(herd)
        codes = [site.call("GET", "/v1/status", "hd1.bogus").status_code for _ in range(25)]
        assert codes[:20] == [401] * 20
        assert set(codes[20:]) == {429}
        # a right token from that source waits too: the limit is on the source
        assert site.call("GET", "/v1/status", site.admin).status_code == 429
    finally:
        herd.stop()


def test_the_live_socket_refuses_anything_but_a_token_first(site: Site) -> None:
    url = "wss://" + site.url.split("://", 1)[1] + "/v1/live"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    async def first(frame: str | bytes) -> int | None:
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send(frame)
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    for frame in (b"\x00\xff binary", "not json", "[1, 2]", '{"token": 5}', '{"token": "hd1.x"}'):
        assert asyncio.run(first(frame)) == 4401, frame
    assert site.call("GET", "/v1/status", site.admin).status_code == 200


def test_the_live_socket_refuses_every_bad_credential(site: Site) -> None:
    url = "wss://" + site.url.split("://", 1)[1] + "/v1/live"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    expired = site.token("read", ttl_s=0.5)
    revoked = site.token("read")
    site.client.revoke_token(security.ApiToken.parse(revoked).id)
    time.sleep(0.6)
    kinds = {
        "none": "",
        "forged join token": security.JoinToken(secrets.token_bytes(32), bytes(32)).encode(),
        "forged API token": security.ApiToken.new(bytes(32)).encode(),
        "expired": expired,
        "revoked": revoked,
        "wrong role": site.token("agent"),
    }
    assert set(kinds) == set(CREDENTIALS)

    async def close_code(token: str) -> int | None:
        async with websockets.connect(url, ssl=context) as ws:
            await ws.send(json.dumps({"token": token}))
            try:
                await asyncio.wait_for(ws.recv(), 10)
            except websockets.ConnectionClosed as closed:
                return closed.rcvd.code if closed.rcvd else None
        return None

    before = store_state(site.herd.home)
    for kind, token in kinds.items():
        assert asyncio.run(close_code(token)) == 4401, kind
    assert store_state(site.herd.home) == before
    read = site.token("read")
    assert asyncio.run(close_code(read)) is None  # the read role watches: a snapshot came
