"""Agents that retire when there is no work, and a local fleet that scales with the queue."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from herder.local import LocalHerd
from herder.model import TaskSpec
from herder.store.sql import SqlStore
from tests.helpers import agent_pids, db_rows, kill_tree, wait_for


def _herder(env: dict[str, str], *args: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "herder", *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def _nodes(env: dict[str, str]) -> dict[str, dict[str, object]]:
    return {n["id"]: n for n in json.loads(_herder(env, "nodes", "--json"))}


def test_an_idle_agent_says_goodbye_and_exits_0(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # a short heartbeat timeout: a node that left must not be declared lost afterwards
    (home / "herder.toml").write_text("[coordinator]\nlost_after_s = 1.0\n")
    local = LocalHerd(nodes=0, home=home)
    with local as herd:
        env = local.env()
        env["HERDER_JOIN"] = _herder(env, "token").strip()
        log_path = tmp_path / "agent.log"
        with open(log_path, "wb") as log:
            agent = subprocess.Popen(
                [sys.executable, "-m", "herder", "agent", "--node-id", "idler", "--idle-exit", "1"],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        try:
            assert herd.map(lambda x: x * 2, range(20)) == [x * 2 for x in range(20)]
            emptied = time.monotonic()
            code = agent.wait(timeout=6)
            left_after = time.monotonic() - emptied
        finally:
            kill_tree(agent.pid)
        assert code == 0
        assert 0.5 < left_after < 4, left_after
        lines = [ln for ln in log_path.read_text().splitlines() if "idle-exit" in ln]
        assert len(lines) == 1, log_path.read_text()
        assert "no work for" in lines[0]
        node = _nodes(env)["idler"]
        assert (node["state"], node["reason"]) == ("terminated", "idle")
        story = db_rows(
            home,
            "SELECT action, json_extract(data, '$.reason') FROM events "
            "WHERE node_id = 'idler' AND action LIKE 'node_%' ORDER BY id",
        )
        assert story[-2:] == [("node_draining", "idle"), ("node_terminated", "idle")]
        time.sleep(1.5)  # past lost_after_s: still terminated, the coordinator still serving
        assert _nodes(env)["idler"]["state"] == "terminated"
        assert local.process is not None
        assert local.process.poll() is None


def test_a_stopped_agent_is_terminated_not_lost(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "herder.toml").write_text("[coordinator]\nlost_after_s = 1.0\n")
    local = LocalHerd(nodes=0, home=home)
    with local:
        env = local.env()
        env["HERDER_JOIN"] = _herder(env, "token").strip()
        agent = subprocess.Popen(
            [sys.executable, "-m", "herder", "agent", "--node-id", "stopped"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            wait_for(lambda: "stopped" in _nodes(env), 15, "the agent to pair")
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(timeout=10) == 0
        finally:
            kill_tree(agent.pid)
        time.sleep(1.5)  # past lost_after_s
        node = _nodes(env)["stopped"]
        assert (node["state"], node["reason"]) == ("terminated", "drained")
        assert local.process is not None
        assert local.process.poll() is None


def test_up_idle_exit_retires_the_herd_and_brings_it_back_for_new_work(tmp_path: Path) -> None:
    local = LocalHerd(nodes=2, home=tmp_path, extra_args=["--idle-exit", "1"])
    with local as herd:
        assert herd.map(abs, range(-20, 0)) == list(range(20, 0, -1))
        wait_for(lambda: not agent_pids(tmp_path), 6, "the agents to retire")
        first = _nodes(local.env())
        assert first
        assert {(n["state"], n["reason"]) for n in first.values()} == {("terminated", "idle")}
        # no respawn while there is no work (several fleet passes)
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert not agent_pids(tmp_path)
            time.sleep(0.1)
        assert _nodes(local.env()).keys() == first.keys()

        # new work brings agents back, never more than the ceiling of 2
        futures = [herd.command(["sleep", "0.3"]) for _ in range(6)]
        peak = 0
        deadline = time.monotonic() + 20
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            peak = max(peak, len(agent_pids(tmp_path)))
            time.sleep(0.05)
        for f in futures:
            assert f.result(timeout=1)["returncode"] == 0
        assert 1 <= peak <= 2
        second = _nodes(local.env()).keys() - first.keys()
        assert 1 <= len(second) <= 2
        wait_for(lambda: not agent_pids(tmp_path), 6, "the new agents to retire")


async def test_count_ready_counts_matching_ready_tasks_up_to_a_limit(store_url: str) -> None:
    """What the on-demand fleet asks before starting agents (both backends)."""
    store = SqlStore(store_url)
    await store.open()
    try:

        def task(tid: str, deps: list[str] | None = None, **labels: str) -> TaskSpec:
            return TaskSpec(id=tid, kind="call", payload=b"x", depends_on=deps or [], labels=labels)

        specs = [task(f"t{i}") for i in range(5)] + [task("gpu", gpu="1"), task("w", ["t0"])]
        await store.submit("j", None, specs, now=1.0)
        assert await store.count_ready([""], 100) == 5  # not the gpu task, not the waiting one
        assert await store.count_ready([""], 3) == 3
        assert await store.count_ready(["", "gpu=1"], 100) == 6
        assert await store.count_ready([], 100) == 0
        await store.claim("n1", [""], 2, now=2.0)
        assert await store.count_ready([""], 100) == 3
    finally:
        await store.close()
