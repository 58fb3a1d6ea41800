"""Case 12 of the fault suite: clock jumps on an agent.

The agent runs in its own time namespace (``unshare --time``, root only)
whose monotonic clock is an hour ahead of the coordinator's, and its wall
clock jumps by ±1 h on a seeded schedule while it runs tasks (an injected
clock: a ``sitecustomize`` in the agent's Python adds an offset, read from a
file, to ``time.time``). Leases are measured with each side's monotonic
clock, so neither may cause a requeue.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from herder.local import LocalHerd
from tests.faults.fault_checker import SubmissionLog, check
from tests.faults.fault_suite import (
    Nemesis,
    call_spec,
    fault_seed,
    join_token,
    record,
    schedule,
    size,
    submit,
    wait_settled,
)

SITECUSTOMIZE = '''
"""The fault suite's injected wall clock: time.time() plus the offset in a file."""
import os
import time

_path = os.environ["HERDER_TEST_CLOCK_FILE"]
_real = time.time


def _jumped():
    try:
        with open(_path) as f:
            return _real() + float(f.read() or 0)
    except (OSError, ValueError):
        return _real()


time.time = _jumped
'''


def sleepy(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def agent_command() -> list[str]:
    argv = [sys.executable, "-m", "herder", "agent", "--slots", "2"]
    if os.geteuid() == 0 and shutil.which("unshare"):
        # its monotonic clock an hour ahead of the coordinator's
        return ["unshare", "--time", "--monotonic", "3600", "--boottime", "3600", *argv]
    return argv


def test_clock_jumps_on_an_agent_cause_no_requeue(tmp_path: Path) -> None:
    seed = fault_seed("clock")
    clock_file = tmp_path / "clock-offset"
    clock_file.write_text("0")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = SubmissionLog()
    herd = LocalHerd(nodes=0, home=tmp_path)
    herd.start()
    try:
        env = {
            **herd.env(),
            "HERDER_JOIN": join_token(tmp_path, herd.url),
            "HERDER_EXEC_LOG": str(tmp_path / "exec.log"),
            "HERDER_TEST_CLOCK_FILE": str(clock_file),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        }
        offsets = {"forward": "3600", "back": "-3600", "none": "0"}

        faults = schedule(seed, list(offsets), size(4, 20), every_s=size(2.0, 3.0))
        actions = {name: _jumper(clock_file, value) for name, value in offsets.items()}
        with (
            open(tmp_path / "agent.log", "wb") as agent_log,
            subprocess.Popen(agent_command(), env=env, stdout=agent_log, stderr=agent_log) as agent,
        ):
            try:
                herd.wait_nodes(1)
                started = time.monotonic()
                n = size(8, 40)
                with Nemesis(faults, actions).running() as nemesis:
                    submit(herd.env(), [[call_spec(sleepy, 2.0) for _ in range(n)]], log)
                    wait_settled(tmp_path / "herd.db", log.acknowledged, timeout=n * 2 + 60)
                wall = time.monotonic() - started
            finally:
                agent.terminate()
                try:
                    agent.wait(30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait()
    finally:
        herd.stop()
    verdict = check(tmp_path / "herd.db", log, tmp_path / "exec.log")
    conn = sqlite3.connect(tmp_path / "herd.db")
    try:
        attempts = conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    finally:
        conn.close()
    record(
        "12-clock",
        "clock jumps of ±1 h on an agent (monotonic clock 1 h ahead)",
        seed,
        verdict,
        faults=len(nemesis.injected),
        requeues=attempts - n,
        wall_s=round(wall, 1),
        fault_free_s=n * 2.0 / 2,
    )
    assert verdict.ok, f"seed {seed}: {verdict}"
    assert attempts == n, f"seed {seed}: {attempts - n} spurious requeues"
    assert nemesis.injected, f"seed {seed}: no clock jump happened during the run"


def _jumper(clock_file: Path, offset: str) -> Callable[[float], str]:
    def jump(pick: float) -> str:
        del pick  # one agent: nothing to choose
        clock_file.write_text(offset)
        return f"wall clock offset {offset} s"

    return jump
