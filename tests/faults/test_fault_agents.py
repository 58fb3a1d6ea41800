"""Cases 7, 8 and 10 of the fault suite: a frozen agent, long tasks, a draining agent.

- 7: SIGSTOP an agent for several leases, then SIGCONT: its late results are
  refused and exactly one result per task is recorded.
- 8: tasks that run many leases long while their agent heartbeats: no
  spurious requeue.
- 10: SIGTERM on an agent: the tasks it held but had not started are
  claimable elsewhere within a second.

The lease is the coordinator's default (lost after 5 s without a heartbeat).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import psutil

from tests.faults.fault_checker import SubmissionLog, check, read_exec_log
from tests.faults.fault_suite import (
    call_spec,
    fault_herd,
    fault_seed,
    record,
    size,
    submit,
    wait_settled,
)
from tests.helpers import wait_for

LEASE_S = 5.0


def nap(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def running_on(home: Path) -> dict[str, str]:
    """task id -> node id of the attempts started and not ended (the execution log)."""
    runs = read_exec_log(home / "exec.log")
    ended = {r.lease for r in runs if r.event == "end"}
    return {r.task: r.node for r in runs if r.event == "start" and r.lease not in ended}


def node_pid(herd_env: dict[str, str], node: str) -> int:
    from herder.client import Client

    with Client(env=herd_env) as client:
        return int(next(n["pid"] for n in client.nodes() if n["id"] == node))


def test_sigstop_for_three_leases_refuses_the_late_results(tmp_path: Path) -> None:
    seed = fault_seed("sigstop")
    frozen_s = size(2, 3) * LEASE_S
    n = size(8, 40)
    log = SubmissionLog()
    herd = fault_herd(tmp_path, 2, 2)
    herd.start()
    try:
        herd.wait_nodes()
        submit(herd.env(), [[call_spec(nap, 1.0) for _ in range(n)]], log)
        busy = wait_for(lambda: running_on(tmp_path), 20, "tasks to start")
        node = random.Random(seed).choice(sorted(set(busy.values())))
        agent = psutil.Process(node_pid(herd.env(), node))
        started = time.monotonic()
        agent.suspend()
        try:
            time.sleep(frozen_s)
        finally:
            agent.resume()
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=120)
        wall = time.monotonic() - started
        time.sleep(3)  # the thawed agent's results arrive (and must be refused)
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    late = late_results(tmp_path, node)
    record(
        "7-sigstop",
        f"SIGSTOP an agent for {frozen_s / LEASE_S:.0f} leases",
        seed,
        verdict,
        faults=1,
        late_results_refused=late,
        wall_s=round(wall, 1),
    )
    assert verdict.ok, f"{verdict}"
    assert verdict.reexecutions >= 1  # the frozen agent's tasks really ran elsewhere


def late_results(home: Path, node: str) -> int:
    """Results the frozen agent finished for leases the store had already declared lost."""
    conn = sqlite3.connect(home / "herd.db")
    try:
        lost = {
            lid for (lid,) in conn.execute("SELECT lease_id FROM attempts WHERE outcome='lost'")
        }
    finally:
        conn.close()
    runs = read_exec_log(home / "exec.log")
    return sum(1 for r in runs if r.event == "end" and r.node == node and r.lease in lost)


def test_tasks_many_leases_long_are_not_requeued(tmp_path: Path) -> None:
    length = size(3, 10) * LEASE_S
    log = SubmissionLog()
    herd = fault_herd(tmp_path, 2, 2, HERDER_PREFETCH="0")  # all four run at once
    herd.start()
    try:
        herd.wait_nodes()
        started = time.monotonic()
        submit(herd.env(), [[call_spec(nap, length) for _ in range(4)]], log)
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=length + 60)
        wall = time.monotonic() - started
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    conn = sqlite3.connect(tmp_path / "herd.db")
    try:
        attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        conn.close()
    record(
        "8-long-tasks",
        f"tasks {length / LEASE_S:.0f} leases long, heartbeating",
        None,
        verdict,
        faults=0,
        requeues=attempts - 4,
        wall_s=round(wall, 1),
        fault_free_s=length,
    )
    assert verdict.ok, f"{verdict}"
    assert attempts == 4, "a heartbeating task was requeued"
    assert verdict.reexecutions == 0, "a heartbeating task was run again"


def warm_up(env: dict[str, str], home: Path, log: SubmissionLog) -> None:
    """Run a few short tasks first: a slot's worker starts with its first task, and an
    agent busy starting one answers signals late (not what this case measures)."""
    submit(env, [[call_spec(nap, 0.01) for _ in range(4)]], log)
    wait_settled(home / "herd.db", log.acknowledged, timeout=60)


def test_sigterm_drain_hands_back_unstarted_tasks_within_a_second(tmp_path: Path) -> None:
    seed = fault_seed("drain")
    log = SubmissionLog()
    # one slot each, and a prefetch: the agent holds tasks it has not started
    herd = fault_herd(tmp_path, 2, 1, HERDER_PREFETCH="3")
    herd.start()
    try:
        herd.wait_nodes()
        warm_up(herd.env(), tmp_path, log)
        submit(herd.env(), [[call_spec(nap, 2.0) for _ in range(8)]], log)
        busy = wait_for(lambda: running_on(tmp_path), 20, "tasks to start")
        node = random.Random(seed).choice(sorted(set(busy.values())))

        def held_unstarted() -> set[str]:
            started = {r.task for r in read_exec_log(tmp_path / "exec.log") if r.node == node}
            conn = sqlite3.connect(tmp_path / "herd.db", timeout=10)
            try:
                held = {t for (t,) in conn.execute("SELECT id FROM tasks WHERE node_id=?", (node,))}
            finally:
                conn.close()
            return held - started

        queued = wait_for(held_unstarted, 10, "the agent to hold queued tasks")
        os.kill(node_pid(herd.env(), node), signal.SIGTERM)
        sent = time.monotonic()
        wait_for(lambda: not (held_unstarted() & queued), 10, "the queued tasks to be handed back")
        handed_back_s = time.monotonic() - sent
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=120)
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    record(
        "10-drain",
        "SIGTERM on an agent (graceful drain)",
        seed,
        verdict,
        faults=1,
        queued_tasks=len(queued),
        handed_back_s=round(handed_back_s, 2),
    )
    assert verdict.ok, f"{verdict}"
    assert handed_back_s <= 1.0, f"queued tasks handed back after {handed_back_s:.2f}s"
