"""Faults on one machine: kill -9 of agents and of the coordinator, a frozen agent.

Each test checks the store itself afterwards: every acknowledged task
finished, and exactly one result was recorded per task.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import psutil

from herder.local import LocalHerd
from tests.helpers import (
    agent_pids,
    db_rows,
    free_port,
    kill_tree,
    succeeded_attempts,
    wait_for,
)


def slow_square(x: int) -> int:
    time.sleep(0.01)
    return x * x


def test_kill9_agents_under_load_loses_nothing(tmp_path: Path) -> None:
    with LocalHerd(nodes=3, slots=2, home=tmp_path) as herd:
        results: list[int] = []
        worker = threading.Thread(
            target=lambda: results.extend(herd.map(slow_square, range(600), timeout=60))
        )
        worker.start()
        killed = 0
        deadline = time.monotonic() + 60
        while worker.is_alive() and killed < 3 and time.monotonic() < deadline:
            time.sleep(0.7)
            pids = agent_pids(tmp_path)
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed += 1
        worker.join(120)
        assert not worker.is_alive()
        assert results == [x * x for x in range(600)]
        assert killed >= 1
        counts = succeeded_attempts(tmp_path)
        assert len(counts) == 600
        assert set(counts.values()) == {1}
        lost = db_rows(tmp_path, "SELECT count(*) FROM attempts WHERE outcome='lost'")[0][0]
        assert lost >= 1  # the kills really hit running work


def test_kill9_coordinator_mid_run_loses_nothing(tmp_path: Path) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    first = LocalHerd(nodes=2, slots=2, home=tmp_path, listen=listen)
    client = first.start()
    acknowledged = [client.command(["sleep", "0.02"]).task_id for _ in range(300)]
    wait_for(
        lambda: db_rows(tmp_path, "SELECT count(*) FROM tasks WHERE state='succeeded'")[0][0] > 50,
        60,
        "some progress before the kill",
    )
    first.kill()
    pids = agent_pids(tmp_path)
    try:
        second = LocalHerd(nodes=2, slots=2, home=tmp_path, listen=listen)
        client = second.start()
        try:
            futures = [client.future(t, kind="command") for t in acknowledged]
            for f in futures:
                assert f.result(timeout=90)["returncode"] == 0
            states = dict(db_rows(tmp_path, "SELECT id, state FROM tasks"))
            assert all(states[t] == "succeeded" for t in acknowledged)
            counts = succeeded_attempts(tmp_path)
            assert all(counts[t] == 1 for t in acknowledged)
            alive = [n for n in client.nodes() if n["state"] in ("ready", "busy")]
            assert len(alive) == 2  # the old agents came back; none were added
        finally:
            second.stop()
    finally:
        for pid in pids:
            kill_tree(pid)


def test_a_frozen_agent_is_lost_and_its_late_result_is_not_recorded(tmp_path: Path) -> None:
    with LocalHerd(nodes=2, slots=1, home=tmp_path) as herd:
        f = herd.command(["sleep", "3"], retries=2)
        detail = wait_for(
            lambda: (d := herd.task(f.task_id))["task"]["state"] == "running" and d,
            15,
            "the task to start",
        )
        node = detail["task"]["node_id"]
        pid = next(n["pid"] for n in herd.nodes() if n["id"] == node)
        frozen = psutil.Process(pid)
        frozen.suspend()
        try:
            time.sleep(7)  # longer than the 5 s lease
        finally:
            frozen.resume()
        assert f.result(timeout=60)["returncode"] == 0
        attempts = herd.task(f.task_id)["attempts"]
        assert [a["outcome"] for a in attempts] == ["lost", "succeeded"]
        assert attempts[1]["node_id"] != node
        time.sleep(4)  # the thawed agent reports or drops its stale lease meanwhile
        assert succeeded_attempts(tmp_path)[f.task_id] == 1
        assert herd.task(f.task_id)["attempts"] == attempts


def test_an_agent_without_its_coordinator_stops_its_tasks(tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    herd = LocalHerd(nodes=1, home=tmp_path)
    client = herd.start()
    herd.wait_nodes(1)
    pids = agent_pids(tmp_path)
    try:
        client.command(["sleep", "300"], env={"HERDER_TEST_MARKER": marker})

        def marked() -> list[psutil.Process]:
            found = []
            for p in psutil.process_iter():
                try:
                    if p.environ().get("HERDER_TEST_MARKER") == marker:
                        found.append(p)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            return found

        wait_for(marked, 15, "the task to start")
        herd.kill()
        killed_at = time.monotonic()
        wait_for(lambda: not marked(), 12, "the agent to stop its task")
        assert time.monotonic() - killed_at >= 4  # not before its lease could have expired
    finally:
        for pid in pids:
            kill_tree(pid)
