"""Case 6 of the fault suite: an agent partitioned from its coordinator.

The agent runs in a network namespace (``tests/netns.py``, root only) and its
veth link goes down for a while, then up. A short partition (3 s, inside the
5 s lease) must requeue nothing. A longer one requeues its tasks on the
other agent within 7 s, the partitioned agent stops its own copies once its
lease is gone, its late results are refused, and it re-pairs within 5 s of
the link returning. ``make test`` runs the 3 s and 12 s partitions, ``make faults``
also the 30 s and 120 s ones.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from herder.client import Client
from herder.local import LocalHerd
from tests.faults.fault_checker import SubmissionLog, check, read_exec_log
from tests.faults.fault_suite import FULL, call_spec, join_token, record, submit, wait_settled
from tests.helpers import free_port, herder, wait_for
from tests.netns import Namespace, host_namespaces, link_cut

LEASE_S = 5.0
PARTITIONS = [3.0, 12.0, 30.0, 120.0] if FULL else [3.0, 12.0]
NODE = "partitioned-1"


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def node_state(client: Client, node: str) -> str | None:
    return next((n["state"] for n in client.nodes() if n["id"] == node), None)


@pytest.mark.parametrize("down_s", PARTITIONS)
def test_partitioned_agent(tmp_path: Path, down_s: float) -> None:
    # the namespace first: the coordinator accepts the addresses its host has at its start
    with host_namespaces(1) as (ns,):
        down_at, repaired_s, log = partition_run(tmp_path, ns, down_s)
    exec_log = tmp_path / "exec.log"
    verdict = check(tmp_path / "herd.db", log, exec_log)
    runs = read_exec_log(exec_log)
    moved = [
        r.at - down_at for r in runs if r.event == "start" and r.node != NODE and r.at > down_at
    ]
    stopped = [r for r in runs if r.event == "end" and r.node == NODE and r.at < down_at + down_s]
    conn = sqlite3.connect(tmp_path / "herd.db")
    try:
        attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        conn.close()
    record(
        f"6-partition-{down_s:.0f}s",
        f"agent partitioned for {down_s:.0f} s",
        None,
        verdict,
        faults=1,
        requeues=attempts - 2,
        requeued_after_s=round(max(moved), 2) if moved else None,
        stopped_own_tasks=len(stopped),
        repaired_after_s=None if repaired_s is None else round(repaired_s, 2),
    )
    assert verdict.ok, f"{verdict}"
    if down_s < LEASE_S:
        assert attempts == 2, "a partition shorter than the lease requeued a task"
        return
    assert len(moved) == 2, "the partitioned agent's tasks did not run elsewhere"
    assert max(moved) <= 7.0, f"requeued after {max(moved):.1f}s"
    assert repaired_s is not None, "the agent did not pair again"
    assert repaired_s <= 5.0, f"re-paired {repaired_s:.1f}s after the link returned"
    assert len(stopped) == 2, "the partitioned agent ran its tasks on after its lease was gone"


def repair_time(client: Client, up_at: float) -> float | None:
    """Seconds from the link's return until the agent is paired (ready or busy) again;
    None when it was never lost (and inf when it did not come back within 30 s)."""
    if node_state(client, NODE) in ("ready", "busy"):
        return None
    deadline = up_at + 30
    while time.monotonic() < deadline:
        if node_state(client, NODE) in ("ready", "busy"):
            return time.monotonic() - up_at
        time.sleep(0.05)
    return float("inf")


def partition_run(
    tmp_path: Path, ns: Namespace, down_s: float
) -> tuple[float, float | None, SubmissionLog]:
    """Two agents (one in ``ns``), two tasks on the namespaced one, its link down for
    ``down_s``: (when the link went down, the re-pair time, the submission log)."""
    port = free_port()
    exec_log = tmp_path / "exec.log"
    log = SubmissionLog()
    herd = LocalHerd(
        nodes=1,
        slots=2,
        home=tmp_path,
        listen=f"0.0.0.0:{port}",
        env={**os.environ, "HERDER_EXEC_LOG": str(exec_log), "HERDER_PREFETCH": "0"},
    )
    client = herd.start()
    try:
        herd.wait_nodes(1)
        (local_node,) = [n["id"] for n in client.nodes() if n["state"] in ("ready", "busy")]
        env = {
            **herd.env(),
            "HERDER_JOIN": join_token(tmp_path, f"https://{ns.gateway}:{port}"),
            "HERDER_EXEC_LOG": str(exec_log),
            "HERDER_PREFETCH": "0",
        }
        argv = [sys.executable, "-m", "herder", "agent", "--slots", "2", "--node-id", NODE]
        with (
            open(tmp_path / "agent.log", "wb") as agent_log,
            ns.popen(argv, env=env, stdout=agent_log, stderr=agent_log) as agent,
        ):
            try:
                herd.wait_nodes(2)
                # the tasks go to the namespaced agent: the local one is paused until then
                herder(herd.env(), "agent", "pause", local_node)
                length = down_s + 3 * LEASE_S
                specs = [call_spec(sleepy, length) for _ in range(2)]
                submit(herd.env(), [specs], log)
                wait_for(
                    lambda: len({r.task for r in read_exec_log(exec_log) if r.node == NODE}) == 2,
                    30,
                    "both tasks to start on the partitioned agent",
                )
                herder(herd.env(), "agent", "resume", local_node)
                with link_cut(ns):
                    down_at = time.time()
                    time.sleep(down_s)
                up_at = time.monotonic()
                repaired_s = repair_time(client, up_at)
                wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=length * 2 + 60)
                time.sleep(2)  # late results from the partitioned agent arrive now
            finally:
                agent.terminate()
                agent.wait(30)
    finally:
        herd.stop()
    return down_at, repaired_s, log
