"""Pairing: only an agent and a coordinator that share the secret and the CA ever pair."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from herder.local import LocalHerd
from herder.security import JoinToken
from tests.helpers import agent_pids, free_port, kill_tree, wait_for


@pytest.fixture
def empty_herd() -> Iterator[LocalHerd]:
    """A coordinator with no agents of its own."""
    herd = LocalHerd(nodes=0)
    herd.start()
    try:
        yield herd
    finally:
        herd.stop()


def _token(herd: LocalHerd) -> JoinToken:
    out = subprocess.run(
        [sys.executable, "-m", "herder", "token"],
        env=herd.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return JoinToken.parse(out)


def _run_agent(herd: LocalHerd, join: JoinToken) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in herd.env().items() if k != "HERDER_HOME"}
    return subprocess.run(
        [sys.executable, "-m", "herder", "agent", "--join", join.encode(), "--orphan-after", "20"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_wrong_secret_is_refused_on_both_sides(empty_herd: LocalHerd) -> None:
    client = empty_herd.client
    assert client is not None
    task = client.command(["true"])
    good = _token(empty_herd)
    rogue = JoinToken(secrets.token_bytes(32), good.fingerprint, good.url)
    done = _run_agent(empty_herd, rogue)
    assert done.returncode == 1
    reason = done.stdout.strip().splitlines()
    assert len(reason) == 1
    assert "secret" in reason[0]
    assert rogue.secret.hex() not in done.stdout + done.stderr
    refused = [e for e in client.event_log(limit=1000) if e["action"] == "pairing_refused"]
    assert refused
    assert client.nodes() == []
    assert client.task(task.task_id)["task"]["state"] == "ready"


def test_a_wrong_fingerprint_is_refused(empty_herd: LocalHerd) -> None:
    client = empty_herd.client
    assert client is not None
    task = client.command(["true"])
    good = _token(empty_herd)
    done = _run_agent(empty_herd, JoinToken(good.secret, secrets.token_bytes(32), good.url))
    assert done.returncode == 1
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    assert "fingerprint" in lines[0]
    assert client.nodes() == []
    assert client.task(task.task_id)["task"]["state"] == "ready"


def test_a_good_token_pairs_from_outside(empty_herd: LocalHerd) -> None:
    client = empty_herd.client
    assert client is not None
    env = {k: v for k, v in empty_herd.env().items() if k != "HERDER_HOME"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "herder",
            "agent",
            "--join",
            _token(empty_herd).encode(),
            "--label",
            "zone=test",
            "--slots",
            "2",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        nodes = wait_for(lambda: client.nodes(), 15, "the agent to pair")
        assert nodes[0]["labels"] == {"zone": "test"}
        assert nodes[0]["slots"] == 2
        assert client.command(["echo", "hi"]).result(timeout=30)["stdout_tail"] == "hi\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        kill_tree(proc.pid)


def test_agents_reconnect_when_the_coordinator_comes_back(tmp_path: os.PathLike[str]) -> None:
    port = free_port()
    first = LocalHerd(nodes=1, home=tmp_path, listen=f"127.0.0.1:{port}")  # type: ignore[arg-type]
    first.start()
    first.wait_nodes(1)
    [pid] = agent_pids(first.home)
    try:
        first.kill()
        time.sleep(1.5)  # the agent backs off and retries meanwhile
        assert psutil.pid_exists(pid)
        second = LocalHerd(nodes=1, home=tmp_path, listen=f"127.0.0.1:{port}")  # type: ignore[arg-type]
        second.start()
        try:
            second.wait_nodes(1, timeout=15)
            assert agent_pids(second.home) == [pid]  # adopted, not replaced
            assert second.client is not None
            assert second.client.submit(pow, 3, 2).result(timeout=30) == 9
        finally:
            second.stop()
    finally:
        kill_tree(pid)
