"""A slot's worker is started when the agent starts, not by its first task."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

from herder.local import LocalHerd
from tests.helpers import agent_pids, wait_for


def _workers(agent_pid: int) -> set[int]:
    return {
        child.pid
        for child in psutil.Process(agent_pid).children()
        if "herder.agent.worker" in child.cmdline()
    }


def test_each_slot_has_a_worker_before_any_task_and_the_first_task_runs_in_it(
    tmp_path: Path,
) -> None:
    herd = LocalHerd(nodes=1, slots=2, home=tmp_path)
    client = herd.start()
    try:
        herd.wait_nodes(1, timeout=60)
        (agent,) = agent_pids(tmp_path)
        wait_for(lambda: len(_workers(agent)) == 2, 20, "2 workers started ahead of any task")
        workers = _workers(agent)
        ran_in = {client.submit(os.getpid).result(timeout=60) for _ in range(4)}
        assert ran_in <= workers  # no new worker was started for them
        assert _workers(agent) == workers
    finally:
        herd.stop()
