"""The node supervisor with real coordinators, real agent processes and the
herds of tests/herds.py: the count kept, boot timeouts, provider failures,
policies, callbacks, and ``herder scale/drain/terminate``."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from herder.local import LocalHerd
from tests.helpers import agent_pids, db_rows, herder, kill_tree, wait_for

ROOT = Path(__file__).resolve().parents[2]


def herd_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["HERDER_TEST_LOG"] = str(tmp_path / "callbacks.jsonl")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def run_herd(tmp_path: Path) -> Iterator[Any]:
    started: list[LocalHerd] = []

    def start(name: str, *extra: str) -> LocalHerd:
        local = LocalHerd(
            nodes=0,
            herd=f"tests.herds:{name}",
            home=tmp_path / "home",
            env=herd_env(tmp_path),
            extra_args=list(extra),
        )
        local.start()
        started.append(local)
        return local

    yield start
    for local in started:
        local.stop()
        for pid in agent_pids(local.home):
            kill_tree(pid)


def notes(tmp_path: Path) -> list[list[Any]]:
    path = tmp_path / "callbacks.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)[1:] for line in path.read_text().splitlines()]


def nodes(local: LocalHerd) -> dict[str, dict[str, Any]]:
    assert local.client is not None
    return {n["id"]: n for n in local.client.nodes()}


def serving(local: LocalHerd) -> list[str]:
    return [i for i, n in nodes(local).items() if n["state"] in ("ready", "busy")]


def events(local: LocalHerd, action: str) -> list[tuple[Any, ...]]:
    return db_rows(
        local.home, "SELECT node_id, data FROM events WHERE action = ? ORDER BY id", action
    )


def test_target_count_is_kept_after_two_agents_are_killed(run_herd: Any) -> None:
    local = run_herd("KeepFour")
    wait_for(lambda: len(serving(local)) == 4, 30, "4 ready nodes")
    victims = agent_pids(local.home)[:2]
    for pid in victims:
        kill_tree(pid)
    killed_at = time.monotonic()
    peak = 0
    back_in = None
    while time.monotonic() - killed_at < 8:
        alive = [n for n in nodes(local).values() if n["state"] not in ("terminated", "lost")]
        peak = max(peak, len(alive), len(agent_pids(local.home)))
        if (
            back_in is None
            and len(serving(local)) == 4
            and not set(victims) & set(agent_pids(local.home))
        ):
            back_in = time.monotonic() - killed_at
        time.sleep(0.05)
    assert back_in is not None, "not back to 4 ready nodes within 8 s"
    assert back_in < 5, f"back to 4 ready nodes after {back_in:.1f}s"
    assert peak <= 5
    lost = [n for n in nodes(local).values() if n["state"] == "lost"]
    assert len(lost) == 2
    assert {n["reason"] for n in lost} == {"process exited"}


def test_a_provider_that_raises_backs_off_and_records_events(run_herd: Any, tmp_path: Path) -> None:
    local = run_herd("Broken")
    time.sleep(7.5)
    spawns = [n for n in notes(tmp_path) if n[0] == "spawn"]
    # 1 s doubling: tries at about 0, 1, 3, 7 s; never a try every pass (about 8)
    assert 2 <= len(spawns) <= 4, spawns
    errors = events(local, "provider_error")
    assert len(errors) == len(spawns)
    assert "no capacity today" in errors[0][1]
    failed = [n for n in nodes(local).values() if n["state"] == "terminated"]
    assert failed
    assert all("no capacity today" in n["reason"] for n in failed)
    assert all(n["reason"].startswith("provider error") for n in failed)
    assert local.client is not None
    assert local.client.status()


def test_a_node_that_never_pairs_is_terminated_at_its_boot_timeout_and_replaced(
    run_herd: Any, tmp_path: Path
) -> None:
    local = run_herd("SlowBoot")
    wait_for(
        lambda: len([n for n in notes(tmp_path) if n[0] == "killed"]) >= 2,
        12,
        "two boot timeouts",
    )
    timed_out = [n for n in nodes(local).values() if n["reason"] == "boot timeout"]
    assert len(timed_out) >= 2
    assert all(n["state"] == "terminated" for n in timed_out)
    for _, node_id, pid in [n for n in notes(tmp_path) if n[0] == "spawned"][:2]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", node_id
    alive = [n for n in nodes(local).values() if n["state"] in ("requested", "booting")]
    assert len(alive) <= 1  # a replacement, never more than max_nodes + 1 in all


def test_callbacks_come_in_order_and_one_that_raises_does_not_stop_the_herd(
    run_herd: Any, tmp_path: Path
) -> None:
    local = run_herd("Recorder")
    wait_for(lambda: len([n for n in notes(tmp_path) if n[0] == "up"]) == 2, 30, "two node ups")
    ups = [n[1] for n in notes(tmp_path) if n[0] == "up"]
    assert all(n[2] == "ready" for n in notes(tmp_path) if n[0] == "up")
    failed = events(local, "herd_callback_failed")
    assert len(failed) == 1
    assert "on_node_up failed on purpose" in failed[0][1]
    wait_for(
        lambda: {n[1] for n in notes(tmp_path) if n[0] == "telemetry"} == set(ups),
        10,
        "telemetry from both nodes",
    )
    keys = next(n[2] for n in notes(tmp_path) if n[0] == "telemetry")
    assert {"cpu_percent", "mem_used_mb", "disk_free_gb", "load1"} <= set(keys)

    victim = ups[0]
    herder(local.env(), "terminate", victim)
    wait_for(
        lambda: ["terminated", victim] in [n[:2] for n in notes(tmp_path)], 15, "on_terminated"
    )
    mine = [n for n in notes(tmp_path) if victim in n and n[0] in ("up", "down", "terminated")]
    assert [n[0] for n in mine] == ["up", "down", "terminated"]
    assert mine[1] == ["down", victim, "user"]

    def seen() -> list[str]:
        return [n[1] for n in notes(tmp_path) if n[0] == "event" and n[2] == victim]

    wait_for(lambda: "node_destroyed" in seen(), 5, "on_event with node_destroyed")
    assert seen() == [
        "node_requested",
        "node_booting",
        "node_connected",
        "node_ready",
        "node_terminated",
        "node_destroyed",  # the provider confirmed: the process is gone
    ]
    # replaced, and the herd still calls back
    wait_for(lambda: len([n for n in notes(tmp_path) if n[0] == "up"]) == 3, 20, "a third up")


def test_init_node_that_raises_rejects_the_node_and_it_is_replaced(
    run_herd: Any, tmp_path: Path
) -> None:
    local = run_herd("PickyInit")
    wait_for(lambda: len(serving(local)) == 1, 30, "a node that passed init_node")
    rejected = [n for n in nodes(local).values() if n["reason"] == "init_node failed"]
    assert len(rejected) == 1
    assert rejected[0]["state"] == "terminated"
    assert len([n for n in notes(tmp_path) if n[0] == "init"]) == 2


def test_autoscale_grows_for_waiting_work_and_drains_idle_nodes(run_herd: Any) -> None:
    local = run_herd("Autoscale")
    client = local.client
    assert client is not None
    time.sleep(1.5)
    assert not agent_pids(local.home)  # min_nodes = 0 and nothing to do
    futures = [client.command(["sleep", "1"]) for _ in range(6)]
    peak = 0
    deadline = time.monotonic() + 30
    while not all(f.done() for f in futures) and time.monotonic() < deadline:
        peak = max(peak, len(agent_pids(local.home)))
        time.sleep(0.05)
    assert [f.result(timeout=1)["returncode"] for f in futures] == [0] * 6
    assert 2 <= peak <= 3
    wait_for(lambda: not agent_pids(local.home), 10, "idle nodes drained")
    ended = [n for n in nodes(local).values() if n["state"] == "terminated"]
    assert ended
    assert {n["reason"] for n in ended} == {"idle"}
    attempts = db_rows(local.home, "SELECT attempt FROM tasks")
    assert {a for (a,) in attempts} == {1}  # draining never killed a running task


def test_scale_drain_and_terminate_from_the_cli(run_herd: Any) -> None:
    local = run_herd("KeepFour")
    client = local.client
    assert client is not None
    wait_for(lambda: len(serving(local)) == 4, 30, "4 ready nodes")
    env = local.env()
    refused = herder(env, "scale", "9", check=False)
    assert refused.returncode == 1
    assert "max_nodes" in refused.stderr
    assert client.fleet()["target"] == 4

    # drain a busy node: its task finishes there, then it leaves
    slow = client.command(["sleep", "2"])
    wait_for(lambda: client.task(slow.task_id)["task"]["state"] == "running", 10, "the task to run")
    busy = client.task(slow.task_id)["task"]["node_id"]
    herder(env, "drain", busy)
    assert slow.result(timeout=15)["returncode"] == 0
    assert client.task(slow.task_id)["task"]["attempt"] == 1
    wait_for(lambda: nodes(local)[busy]["state"] == "terminated", 10, "the drained node to end")
    assert nodes(local)[busy]["reason"] == "user"
    wait_for(lambda: len(serving(local)) == 4, 15, "a replacement")

    # terminate a busy node: its task is stopped and runs again elsewhere
    victim_task = client.command(["sleep", "3"])
    wait_for(
        lambda: client.task(victim_task.task_id)["task"]["state"] == "running",
        10,
        "the task to run",
    )
    victim = client.task(victim_task.task_id)["task"]["node_id"]
    herder(env, "terminate", victim)
    assert nodes(local)[victim]["state"] == "terminated"
    assert victim_task.result(timeout=20)["returncode"] == 0
    done = client.task(victim_task.task_id)["task"]
    assert done["node_id"] != victim
    assert done["attempt"] == 1  # handed back by its agent: the retry budget is not charged

    herder(env, "scale", "2")
    wait_for(lambda: len(serving(local)) == 2, 15, "2 nodes")
    scaled = [n for n in nodes(local).values() if n["reason"] == "scaled down"]
    assert len(scaled) == 2
    assert client.fleet()["target"] == 2
    time.sleep(2)
    assert len(serving(local)) == 2
    assert len(agent_pids(local.home)) == 2
    missing = herder(env, "drain", "no-such-node", check=False)
    assert missing.returncode == 1
    assert "no-such-node" in missing.stderr


def test_a_hung_node_is_lost_then_destroyed_through_its_provider_and_replaced(
    run_herd: Any,
) -> None:
    """A frozen machine still costs money: losing it is not enough, it is ended."""
    local = run_herd("KeepFour")
    wait_for(lambda: len(serving(local)) == 4, 30, "4 ready nodes")
    by_pid = {n["pid"]: i for i, n in nodes(local).items()}
    pid = agent_pids(local.home)[0]
    os.kill(pid, signal.SIGSTOP)  # hung: no heartbeat, no exit
    try:
        victim = by_pid[pid]
        wait_for(lambda: nodes(local)[victim]["state"] == "lost", 10, "the hung node lost")
        assert nodes(local)[victim]["reason"] == "lost heartbeat"
        wait_for(lambda: not psutil.pid_exists(pid), 15, "the hung agent destroyed")
        wait_for(lambda: len(serving(local)) == 4, 15, "a replacement")
        destroyed = [json.loads(d) for n, d in events(local, "node_destroyed") if n == victim]
        assert destroyed == [{"reason": "lost heartbeat"}]
    finally:
        kill_tree(pid)
