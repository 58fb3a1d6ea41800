"""Secrets stay secret: after a herd has worked (tasks, a failure, a command with a
secret variable, API tokens, the agent's pairing), neither the cluster secret, nor
an API token's secret, nor a secret variable's value is in any log, event, task,
metric, store row or datastore object; the files that hold secrets are 0600."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import httpx

from herder import security
from herder.local import LocalHerd

SECRET_VALUE = "v4lue-of-a-secret-variable-31f9"


def fails() -> None:
    raise RuntimeError("a failure, with its traceback kept")


def test_no_secret_is_written_anywhere_but_its_own_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    herd = LocalHerd(nodes=1, home=home, extra_args=["--log-format", "json"])
    client = herd.start()
    try:
        herd.wait_nodes(1)
        api = client.create_token("submit", name="ci")["token"]
        bad = client.submit(fails, retries=0)
        bad.exception(timeout=30)
        cmd = client.command(
            ["sh", "-c", "echo ${#TOKEN}"], env={"TOKEN": SECRET_VALUE}, secret_env=["TOKEN"]
        )
        cmd.result(timeout=30)
        headers = {"authorization": client.aio.http.headers["authorization"]}
        shown = [
            httpx.get(f"{herd.url}{path}", headers=headers, verify=False).text
            for path in (
                "/metrics",
                "/v1/events?limit=10000",
                "/v1/tasks?limit=10000",
                f"/v1/tasks/{cmd.task_id}",
                f"/v1/tasks/{bad.task_id}",
                "/v1/tokens",
                "/v1/nodes",
                "/v1/executors",
                "/v1/status",
            )
        ]
    finally:
        herd.stop()
    secret = security.load_secret(home / "secret")
    api_secret = security.ApiToken.parse(api).secret
    needles = {
        "cluster secret": [secret, base64.urlsafe_b64encode(secret).rstrip(b"=")],
        "API token secret": [api_secret, base64.urlsafe_b64encode(api_secret).rstrip(b"=")],
        "secret variable": [SECRET_VALUE.encode()],
    }
    haystacks: dict[str, bytes] = {f"answer {i}": t.encode() for i, t in enumerate(shown)}
    for path in home.rglob("*"):
        if path.is_file() and path.name != "secret" and path.suffix != ".pem":
            haystacks[str(path.relative_to(home))] = path.read_bytes()
    assert any("herd.db" in name for name in haystacks)  # the store itself is searched
    assert any(name.endswith(".log") for name in haystacks)
    found = [
        (what, where)
        for what, forms in needles.items()
        for where, data in haystacks.items()
        if any(form in data for form in forms)
    ]
    assert found == []
    for private in (home / "secret", home / "tls" / "ca.key", home / "tls" / "server.key"):
        if private.exists():
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
