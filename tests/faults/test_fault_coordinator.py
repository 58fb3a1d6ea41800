"""Case 3 of the fault suite: kill -9 of the coordinator at many points of a run.

The client submits batches (with dependencies) while the agents run them;
the coordinator is killed on a seeded schedule (so during submission,
claims, results and dependency release alike) and restarted on the same
store and port. The client and the agents reconnect by themselves. Then:
no acknowledged submission lost, no result recorded twice; and, with a
backlog in the store, how soon after a restart the first task is claimed.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

from herder.client import Client
from herder.local import LocalHerd
from herder.model import TaskSpec, new_id
from tests.faults.fault_checker import SubmissionLog, check, read_exec_log
from tests.faults.fault_suite import (
    call_spec,
    fault_herd,
    fault_seed,
    record,
    schedule,
    size,
    submit,
    wait_settled,
)
from tests.helpers import agent_pids, free_port, kill_tree, wait_for


def step(i: int) -> int:
    time.sleep(0.02)
    return i


def noop() -> None:
    """A backlog task: only its claim is measured."""


def batches_with_deps(seed: int, n: int, batch: int) -> list[list[TaskSpec]]:
    rng = random.Random(seed ^ 0xC00D)
    specs: list[TaskSpec] = []
    for i in range(n):
        earlier = len(specs) - len(specs) % batch
        deps = [specs[rng.randrange(earlier)].id] if earlier and rng.random() < 0.2 else []
        specs.append(call_spec(step, i, depends_on=deps))
    return [specs[i : i + batch] for i in range(0, n, batch)]


def first_claim_after(exec_log: Path, since: float, timeout: float) -> float:
    """Seconds from ``since`` (wall clock) to the first attempt started after it."""

    def started() -> float | None:
        later = [r.at for r in read_exec_log(exec_log) if r.event == "start" and r.at > since]
        return min(later) if later else None

    at: float = wait_for(started, timeout, "a task to be claimed after the restart", every=0.05)
    return at - since


def test_kill9_coordinator_at_many_points_loses_nothing(tmp_path: Path) -> None:
    seed = fault_seed("coordinator")
    listen = f"127.0.0.1:{free_port()}"
    kills = size(2, 20)
    n = size(300, 3_000)
    log = SubmissionLog()
    faults = schedule(seed, ["kill9-coordinator"], kills, every_s=size(3, 6))
    herd = fault_herd(tmp_path, 2, 2, listen=listen)
    herd.start()
    herd.wait_nodes()
    restarts: list[float] = []
    started = time.monotonic()
    # paced, so that submissions go on across the kills
    submitter = threading.Thread(
        target=submit,
        args=(herd.env(), batches_with_deps(seed, n, 10), log),
        kwargs={"pause_s": size(0.3, 0.2)},
    )
    try:
        submitter.start()
        for fault in faults:
            time.sleep(max(0.0, started + fault.offset_s - time.monotonic()))
            herd.kill()
            herd = fault_herd(tmp_path, 2, 2, listen=listen)
            restarted_at = time.time()
            herd.start()
            if submitter.is_alive():  # work is coming: the first claim is due soon
                restarts.append(first_claim_after(tmp_path / "exec.log", restarted_at, 30))
        submitter.join(300)
        assert not submitter.is_alive(), f"seed {seed}: the submitter is stuck"
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=size(120, 600))
        wall = time.monotonic() - started
        verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
        backlog_start, backlog_claim, herd = claim_with_backlog(
            herd, tmp_path, listen, size(2_000, 100_000)
        )
    finally:
        herd.stop()
        for pid in agent_pids(tmp_path):
            kill_tree(pid)
    record(
        "3-coordinator",
        "kill -9 of the coordinator at many points",
        seed,
        verdict,
        faults=kills,
        wall_s=round(wall, 1),
        first_claim_after_restart_max_s=round(max(restarts), 2) if restarts else None,
        backlog_tasks=size(2_000, 100_000),
        restart_until_ready_with_backlog_s=round(backlog_start, 2),
        first_claim_after_ready_with_backlog_s=round(backlog_claim, 2),
    )
    assert len(log.acknowledged) == n
    assert verdict.ok, f"seed {seed}: {verdict}"
    first_claim = backlog_start + backlog_claim
    assert first_claim <= 5.0, f"seed {seed}: first claim {first_claim:.2f}s after the restart"


def claim_with_backlog(
    herd: LocalHerd, home: Path, listen: str, count: int
) -> tuple[float, float, LocalHerd]:
    """Fill the store with ``count`` tasks, kill -9 the coordinator, restart it: seconds
    from the restart until it is ready, from then to the first claim, and the new herd
    (the backlog cancelled)."""
    job = new_id("j")
    backlog = SubmissionLog()
    specs = [call_spec(noop) for _ in range(count)]
    submit(herd.env(), [specs[i : i + 5_000] for i in range(0, count, 5_000)], backlog, job)
    herd.kill()
    herd = fault_herd(home, 2, 2, listen=listen)
    restarted_at = time.time()
    herd.start()
    ready_at = time.time()
    try:
        claim = first_claim_after(home / "exec.log", ready_at, 60)
        with Client(env=herd.env()) as client:
            client.cancel(job=job)
    except BaseException:
        herd.stop()
        raise
    return ready_at - restarted_at, claim, herd
