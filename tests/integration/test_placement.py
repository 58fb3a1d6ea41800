"""Placement on a real herd: selectors over labels, data and resources; resources
limit concurrency; ``no node matches`` is visible and clears; run_on / run_on_all."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import herder
from herder.errors import SubmissionError, TaskFileError
from herder.local import LocalHerd
from herder.selector import SelectorError
from tests.helpers import herder as run_cli
from tests.helpers import kill_tree, wait_for


def whoami() -> str | None:
    return os.environ.get("HERDER_NODE_ID")


def timed(seconds: float) -> tuple[float, float]:
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


class Fleet:
    def __init__(self, herd: LocalHerd, home: Path) -> None:
        self.herd = herd
        self.home = home
        self.procs: list[subprocess.Popen[bytes]] = []
        self.join = run_cli(herd.env(), "token", "--home", str(home)).stdout.strip()

    def agent(self, node_id: str, *args: str) -> subprocess.Popen[bytes]:
        env = {**self.herd.env(), "HERDER_JOIN": self.join, "HERDER_NODE_ID": node_id}
        log = open(self.home / f"agent-{node_id}.log", "ab")  # noqa: SIM115 - kept by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "herder", "agent", *args],
            env=env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_tree(proc.pid)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("placement")
    herd = LocalHerd(nodes=1, home=home)
    herd.start()
    herd.wait_nodes()
    f = Fleet(herd, home)
    f.agent(
        "gpu-a",
        "--slots", "3",
        "--label", "gpu=1",
        "--data", '{"disk": "ssd"}',
        "--resource", "cpus=2",
    )  # fmt: skip
    f.agent("cpu-b", "--label", "zone=eu-2", "--resource", "cpus=4", "--resource", "gpus=0")
    try:
        herd.wait_nodes(3)
        yield f
    finally:
        f.stop()
        herd.stop()


@pytest.fixture
def herd(fleet: Fleet) -> herder.Client:
    assert fleet.herd.client is not None
    return fleet.herd.client


def test_selectors_route_only_to_matching_nodes(herd: herder.Client) -> None:
    gpu = [herd.submit(whoami, select="gpu == 1") for _ in range(6)]
    assert {f.result(timeout=60) for f in gpu} == {"gpu-a"}
    either = [herd.submit(whoami, select='disk == "ssd" or zone in ["eu-2"]') for _ in range(8)]
    assert {f.result(timeout=60) for f in either} <= {"gpu-a", "cpu-b"}
    big = [herd.submit(whoami, select="cpus >= 4 and not gpu") for _ in range(4)]
    assert {f.result(timeout=60) for f in big} <= {"cpu-b"} | {None}  # the local node may have 4
    nodes = {n["id"]: n for n in herd.nodes()}
    assert nodes["gpu-a"]["data"] == {"disk": "ssd"}
    assert nodes["gpu-a"]["resources"]["cpus"] == 2


def test_resources_limit_concurrency(herd: herder.Client) -> None:
    # gpu-a has 3 slots but 2 cpus: one 2-cpu task at a time
    futs = [
        herd.submit(timed, 0.4, select='node == "gpu-a"', resources={"cpus": 2}) for _ in range(3)
    ]
    spans = sorted(f.result(timeout=60) for f in futs)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end - 0.05, spans
    # tasks that need more than any node has wait, visibly
    huge = herd.submit(whoami, resources={"cpus": 1000})
    wait_for(
        lambda: herd.task(huge.task_id)["task"].get("waiting_reason") == "no node matches",
        10,
        "the reason for the too-big task",
    )
    herd.cancel(huge)


def test_a_selector_no_node_matches_waits_visibly_then_runs(
    fleet: Fleet, herd: herder.Client
) -> None:
    fut = herd.submit(whoami, select="gpu == 8")
    wait_for(
        lambda: herd.task(fut.task_id)["task"].get("waiting_reason") == "no node matches",
        10,
        "no node matches",
    )
    assert herd.task(fut.task_id)["task"]["state"] == "ready"
    shown = run_cli(fleet.herd.env(), "task", fut.task_id).stdout
    assert "no node matches" in shown or '"waiting_reason"' not in shown  # the CLI shows the reason
    proc = fleet.agent("gpu-8", "--label", "gpu=8")
    assert fut.result(timeout=60) == "gpu-8"
    assert herd.task(fut.task_id)["task"].get("waiting_reason") is None
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    # gone means neither ready nor busy (its state lags its last task by a reconcile
    # pass): run_on_all below pins a task to every node it sees in either state
    wait_for(
        lambda: (
            not [n for n in herd.nodes() if n["id"] == "gpu-8" and n["state"] in ("ready", "busy")]
        ),
        30,
        "gpu-8 gone",
    )


def test_run_on_all_and_run_on(fleet: Fleet, herd: herder.Client) -> None:
    fleet.herd.wait_nodes(3)
    everyone = herd.run_on_all(whoami)
    assert len(everyone) == 3
    assert {"gpu-a", "cpu-b"} <= set(everyone)
    assert everyone["gpu-a"] == "gpu-a"
    assert herd.run_on_all(whoami, select="gpu == 1") == {"gpu-a": "gpu-a"}
    assert {herd.run_on("cpu-b", whoami).result(timeout=60) for _ in range(4)} == {"cpu-b"}


def test_bad_selectors_are_refused_and_change_nothing(
    fleet: Fleet, herd: herder.Client, tmp_path: Path
) -> None:
    before = len(herd.tasks(limit=10_000))
    with pytest.raises(SelectorError) as info:
        herd.submit(whoami, select="gpu == and zone")
    assert "^" in str(info.value)
    assert "position 7" in str(info.value)
    bad = tmp_path / "tasks.toml"
    bad.write_text('[[tasks]]\nname = "a"\nrun = "true"\nselect = "gpu >= 1 or"\n')
    with pytest.raises((TaskFileError, SubmissionError)) as file_info:
        herd.push_file(bad)
    assert "task 'a'" in str(file_info.value)
    assert "field 'select'" in str(file_info.value)
    assert "^" in str(file_info.value)
    cli = run_cli(fleet.herd.env(), "push", str(bad), check=False)
    assert cli.returncode != 0
    assert "select" in cli.stdout + cli.stderr
    assert len(herd.tasks(limit=10_000)) == before
