"""Discovery on real networks: two subnets (a Linux bridge each), hosts as namespaces.

Subnet A holds the coordinator and agents, subnet B more agents; the root
namespace routes between them but forwards no broadcast. So a beacon is
heard in A only, while a tracker in the root namespace is reachable from
both. Every process runs for real (``python -m herder`` inside ``ip netns
exec``); the store is read directly to check node states and attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from herder.discovery.beacon import encode_beacon
from herder.discovery.tracker_client import TrackerClient
from herder.security import load_or_create_secret
from tests.helpers import db_rows, free_port, kill_tree, succeeded_attempts, wait_for
from tests.netns import Namespace, Subnet, bridged_subnets, link_cut

PORT = 7420


@pytest.fixture
def net() -> Iterator[list[Subnet]]:
    with bridged_subnets([3, 2]) as subnets:
        yield subnets


class Procs:
    """Processes started for one test, each logging to its own file; all killed at the end."""

    def __init__(self, tmp: Path, secret: bytes) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "HERDER_SECRET": secret.hex(), "HERDER_LOG_LEVEL": "info"}
        self.started: list[subprocess.Popen[bytes]] = []
        self.by_name: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, ns: Namespace | None, name: str, *args: str) -> Path:
        log = self.tmp / f"{name}.log"
        argv = [sys.executable, "-m", "herder", *args]
        with log.open("ab") as out:
            options: dict[str, object] = {"stdout": out, "stderr": subprocess.STDOUT}
            proc = (
                ns.popen(argv, env=self.env, **options)
                if ns is not None
                else subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
            )
        self.started.append(proc)
        self.by_name[name] = proc
        return log

    def close(self) -> None:
        for proc in self.started:
            kill_tree(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    secret = load_or_create_secret(tmp_path / "home" / "secret")
    started = Procs(tmp_path, secret)
    try:
        yield started
    finally:
        started.close()


def coordinator(procs: Procs, ns: Namespace, *args: str, name: str = "coordinator") -> Path:
    home = procs.tmp / "home"
    return procs.start(ns, name, "up", "--home", str(home), "--listen", f"0.0.0.0:{PORT}", *args)


def paired(log: Path, ns: Namespace) -> int:
    """How many times the agent logging to ``log`` paired with the coordinator in ``ns``."""
    return log.read_text().count(f"paired with https://{ns.address}:{PORT}")


def node_state(home: Path, node_id: str) -> str:
    ((state,),) = db_rows(home, "SELECT state FROM nodes WHERE id=?", node_id)
    return str(state)


def listening(ns: Namespace, port: int = 7421) -> bool:
    return f":{port}" in ns.run(["ss", "-Huln"]).stdout


def test_beacon_pairs_within_a_subnet_only_and_ignores_forgeries(
    net: list[Subnet], procs: Procs
) -> None:
    a, b = net
    here = procs.start(a.hosts[1], "agent-a1", "agent", "--discover")
    there = procs.start(b.hosts[0], "agent-b0", "agent", "--discover")
    wait_for(lambda: listening(a.hosts[1]) and listening(b.hosts[0]), 15, "agents listening")

    # Before any coordinator exists: a forged beacon, a correctly signed but old one
    # (a replay from two minutes ago), and 500 packets of garbage. All point nowhere.
    secret = bytes.fromhex(procs.env["HERDER_SECRET"])
    decoy = [f"https://{a.gateway}:9"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((a.gateway, 0))
        target = (a.broadcast, 7421)
        sock.sendto(encode_beacon(secrets.token_bytes(32), "c-x", decoy, bytes(32)), target)
        old = encode_beacon(secret, "c-x", decoy, bytes(32), ts=time.time() - 120)
        sock.sendto(old, target)
        for i in range(500):
            sock.sendto(secrets.token_bytes(1 + (i * 7) % 1400), target)
    time.sleep(1.5)
    assert "discovered" not in here.read_text()

    # A coordinator started after the agents is found, by the agent in its subnet only.
    coordinator(procs, a.hosts[0])
    wait_for(lambda: paired(here, a.hosts[0]), 20, "the agent in subnet A to pair")
    time.sleep(3)  # three more beacons: none crosses to subnet B
    assert "discovered" not in there.read_text()
    assert all(p.poll() is None for p in procs.started)

    # The coordinator moves to another host (same home: same secret, CA and cluster):
    # the agent's connection fails, it listens again and follows.
    first = procs.by_name["coordinator"]
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=30)
    coordinator(procs, a.hosts[2], name="coordinator-moved")
    wait_for(lambda: paired(here, a.hosts[2]), 30, "the agent to follow the coordinator")


def test_a_tracker_joins_agents_of_both_subnets_to_one_coordinator(
    net: list[Subnet], procs: Procs
) -> None:
    a, b = net
    port = free_port()
    url = f"http://{a.gateway}:{port}"
    tracker_log = procs.start(
        None, "tracker", "tracker", "--listen", f"0.0.0.0:{port}", "--ttl", "10"
    )
    wait_for(lambda: "tracker at" in tracker_log.read_text(), 15, "the tracker to start")
    coordinator(procs, a.hosts[0], "--no-beacon", "--tracker", url)
    logs = [
        procs.start(ns, f"agent-{i}", "agent", "--tracker", url, "--node-id", f"n-t{i}")
        for i, ns in enumerate([a.hosts[1], b.hosts[0], b.hosts[1]])
    ]
    for log in logs:
        wait_for(partial(paired, log, a.hosts[0]), 20, f"{log.name} to pair")

    async def hosts() -> list[tuple[str, str]]:
        secret = bytes.fromhex(procs.env["HERDER_SECRET"])
        async with TrackerClient(url, secret) as client:
            return sorted((e.kind, e.id) for e in await client.hosts())

    listed = asyncio.run(hosts())
    assert [k for k, _ in listed].count("coordinator") == 1
    assert {i for k, i in listed if k == "agent"} == {"n-t0", "n-t1", "n-t2"}
    unsigned = httpx.get(f"{url}/v1/hosts", timeout=5)
    assert unsigned.status_code == 401


def test_a_partitioned_agent_is_lost_then_rejoins_and_its_stale_result_is_refused(
    net: list[Subnet], procs: Procs, tmp_path: Path
) -> None:
    a, _ = net
    home = tmp_path / "home"
    coordinator(procs, a.hosts[0])
    cut = procs.start(a.hosts[1], "agent-cut", "agent", "--discover", "--node-id", "n-cut")
    wait_for(lambda: paired(cut, a.hosts[0]), 20, "the agent to pair")

    tasks = tmp_path / "tasks.toml"
    tasks.write_text('job = "part"\n[[tasks]]\nname = "long"\nrun = "sleep 12"\n')
    # Not waited for: the CLI may take its time to leave, the task is in the store at once.
    pusher = a.hosts[0].popen(
        [sys.executable, "-m", "herder", "push", str(tasks), "--home", str(home)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.started.append(pusher)  # reaped at the end
    wait_for(lambda: db_rows(home, "SELECT id FROM tasks"), 15, "the task to be pushed")
    ((task_id,),) = db_rows(home, "SELECT id FROM tasks")

    def attempts() -> list[tuple[str, str | None, float | None]]:
        return [
            (n, o, s)
            for n, o, s in db_rows(
                home,
                "SELECT node_id, outcome, started_at FROM attempts WHERE task_id=? "
                "ORDER BY attempt",
                task_id,
            )
        ]

    def holder() -> tuple[str, str | None]:
        """The task's state and node (attempts are written when they end)."""
        ((state, node),) = db_rows(home, "SELECT state, node_id FROM tasks WHERE id=?", task_id)
        return state, node

    wait_for(lambda: holder() == ("running", "n-cut"), 15, "the task to run on n-cut")
    spare = procs.start(a.hosts[2], "agent-spare", "agent", "--discover", "--node-id", "n-spare")
    wait_for(lambda: paired(spare, a.hosts[0]), 20, "the spare agent to pair")

    with link_cut(a.hosts[1]):
        down_at = time.monotonic()
        wait_for(lambda: node_state(home, "n-cut") == "lost", 6, "the cut-off agent to be lost")
        wait_for(lambda: holder() == ("running", "n-spare"), 5, "the task to move")
        assert attempts()[0][:2] == ("n-cut", "lost")
        time.sleep(max(0.0, 15 - (time.monotonic() - down_at)))
    wait_for(lambda: paired(cut, a.hosts[0]) >= 2, 25, "the agent to rejoin by itself")
    wait_for(lambda: succeeded_attempts(home).get(task_id) == 1, 20, "the task to succeed")
    time.sleep(1)  # the rejoined agent has offered its stale result by now
    assert [(n, o) for n, o, _ in attempts()] == [("n-cut", "lost"), ("n-spare", "succeeded")]
    assert succeeded_attempts(home) == {task_id: 1}
