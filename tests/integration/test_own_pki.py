"""Bring your own PKI: ``herder certs`` writes a CA and certificates, the coordinator
serves with them (join tokens pin that CA), and with ``--agent-mtls`` only an agent
presenting a certificate signed by that CA pairs; the others are refused with a
reason and leave the store as it was."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from herder.client import Client
from herder.local import LocalHerd
from herder.security import JoinToken, ca_fingerprint
from tests.helpers import herder, kill_tree, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    done = herder(
        dict(os.environ), "certs", str(directory), "--host", "127.0.0.1", "--agent", "good"
    )
    assert "CA fingerprint" in done.stdout
    return directory


@pytest.fixture(scope="module")
def site(pki: Path) -> Iterator[tuple[LocalHerd, Client, JoinToken]]:
    env = {
        **os.environ,
        "HERDER_TLS_CERT": str(pki / "server.pem"),
        "HERDER_TLS_KEY": str(pki / "server.key"),
        "HERDER_TLS_CA": str(pki / "ca.pem"),
        "HERDER_AGENT_MTLS": "1",
    }
    h = LocalHerd(nodes=0, env=env, extra_args=["--no-beacon"])
    client = h.start()
    try:
        token = JoinToken.parse(herder(h.env(), "token").stdout.strip())
        yield h, client, token
    finally:
        h.stop()


def _agent(token: JoinToken, *extra: str) -> list[str]:
    join = token.encode()
    return [sys.executable, "-m", "herder", "agent", "--join", join, "--orphan-after", "20", *extra]


def _refused(token: JoinToken, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    return subprocess.run(
        _agent(token, *extra), env=env, capture_output=True, text=True, timeout=60
    )


def _store(client: Client) -> tuple[Any, ...]:
    nodes = client.nodes()
    tasks = sorted((t["id"], t["state"]) for t in client.tasks(limit=1000))
    return nodes, tasks


def test_the_files_are_private_and_the_token_pins_the_users_ca(
    pki: Path, site: tuple[LocalHerd, Client, JoinToken]
) -> None:
    for key in ("ca.key", "server.key", "agent-good.key"):
        assert (pki / key).stat().st_mode & 0o777 == 0o600
    _, _, token = site
    assert token.fingerprint == ca_fingerprint((pki / "ca.pem").read_bytes())


def test_an_agent_with_a_certificate_from_the_ca_pairs_and_runs_a_task(
    pki: Path, site: tuple[LocalHerd, Client, JoinToken]
) -> None:
    h, client, token = site
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
    extra = ("--tls-cert", str(pki / "agent-good.pem"), "--tls-key", str(pki / "agent-good.key"))
    agent = subprocess.Popen(
        _agent(token, "--node-id", "n-good", *extra),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        h.wait_nodes(1)
        task = client.command(["echo", "hello"])
        assert task.result(timeout=60)["stdout_tail"] == "hello\n"
    finally:
        kill_tree(agent.pid)
        agent.wait(30)
    wait_for(
        lambda: all(n["state"] in ("lost", "terminated") for n in client.nodes()),
        30,
        "the node to be gone",
    )


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "self.pem", directory / "self.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.mark.parametrize("kind", ["none", "self-signed", "other CA"])
def test_an_agent_without_a_certificate_of_the_ca_is_refused_with_a_reason(
    kind: str, tmp_path: Path, site: tuple[LocalHerd, Client, JoinToken]
) -> None:
    _, client, token = site
    if kind == "none":
        extra: tuple[str, ...] = ()
        reason = "requires a client certificate signed by its CA"
    else:
        if kind == "self-signed":
            cert, key = _self_signed(tmp_path)
        else:
            herder(dict(os.environ), "certs", str(tmp_path), "--agent", "good")
            cert, key = tmp_path / "agent-good.pem", tmp_path / "agent-good.key"
        extra = ("--tls-cert", str(cert), "--tls-key", str(key))
        reason = "not signed by the cluster's CA"
    task = client.command(["true"])
    before = _store(client)
    done = _refused(token, "--node-id", f"n-{kind.replace(' ', '-')}", *extra)
    assert done.returncode == 1, done.stdout + done.stderr
    assert reason in done.stdout
    assert _store(client) == before  # no node, no task touched
    assert client.task(task.task_id)["task"]["state"] == "ready"
    client.cancel(task.task_id)
