"""Case 9 of the fault suite: poison tasks.

Tasks that crash their worker (a segfault), are killed as the OOM killer
would (SIGKILL after an allocation past an rlimit), leave with ``os._exit``,
or kill their own agent. Each must end ``failed`` after exactly its
``max_attempts``, with a reason recorded; the agents (but the ones a task
killed on purpose, which the local provider replaces) survive; ordinary
tasks submitted alongside all succeed, once each.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from tests.faults.fault_checker import SubmissionLog, check
from tests.faults.fault_suite import call_spec, fault_herd, record, size, submit, wait_settled

ATTEMPTS = 2


def segfault() -> None:
    ctypes.string_at(0)


def oom_killed() -> None:
    """Allocate past an address-space limit; a MemoryError is what the kernel's refusal
    looks like from Python, and the OOM killer's SIGKILL follows it here."""
    resource.setrlimit(resource.RLIMIT_AS, (256 * 2**20, resource.RLIM_INFINITY))
    try:
        bytearray(512 * 2**20)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)


def exits() -> None:
    os._exit(3)


def kills_its_agent() -> None:
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(30)


def fine(i: int) -> int:
    time.sleep(0.02)
    return i


POISONS: dict[str, Callable[[], None]] = {
    "segfault": segfault,
    "oom": oom_killed,
    "os._exit": exits,
    "kills its agent": kills_its_agent,
}


def test_poison_tasks_fail_after_max_attempts_and_spare_the_rest(tmp_path: Path) -> None:
    log = SubmissionLog()
    poison = {name: call_spec(fn, retries=ATTEMPTS - 1) for name, fn in POISONS.items()}
    normal = [call_spec(fine, i) for i in range(size(50, 1_000))]
    herd = fault_herd(tmp_path, 3, 2)
    herd.start()
    try:
        herd.wait_nodes()
        started = time.monotonic()
        in_worker = [spec for name, spec in poison.items() if name != "kills its agent"]
        submit(herd.env(), [[*in_worker, *normal]], log)
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=180)
        # alone: on a slot next to another poison it would take that one down with it
        submit(herd.env(), [[poison["kills its agent"]]], log)
        wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=180)
        wall = time.monotonic() - started
        herd.wait_nodes(timeout=30)  # the agent killed by its task was replaced
    finally:
        herd.stop()
    verdict = check(
        tmp_path / "herd.db",
        log,
        tmp_path / "exec.log",
        expect_by_task={spec.id: "failed" for spec in poison.values()},
    )
    conn = sqlite3.connect(tmp_path / "herd.db")
    try:
        ends = {
            name: conn.execute(
                "SELECT t.reason, count(a.lease_id) FROM tasks t"
                " JOIN attempts a ON a.task_id = t.id"
                " WHERE t.id = ? GROUP BY t.id",
                (spec.id,),
            ).fetchone()
            for name, spec in poison.items()
        }
    finally:
        conn.close()
    record(
        "9-poison",
        "poison tasks (segfault, OOM kill, os._exit, kill of its agent)",
        None,
        verdict,
        faults=len(POISONS) * ATTEMPTS,
        reasons="; ".join(f"{name}: {reason} x{n}" for name, (reason, n) in ends.items()),
        wall_s=round(wall, 1),
    )
    assert verdict.ok, f"{verdict}"
    for name, (reason, n) in ends.items():
        assert n == ATTEMPTS, f"{name}: {n} attempts, not {ATTEMPTS}"
        assert reason, f"{name}: no reason recorded"
