"""``herder wait JOB``: a progress bar with counts by state and an ETA, and the exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from herder.local import LocalHerd
from tests.helpers import herder


@pytest.fixture(scope="module")
def local() -> Iterator[LocalHerd]:
    herd = LocalHerd(nodes=1, slots=2)
    herd.start()
    herd.wait_nodes()
    try:
        yield herd
    finally:
        herd.stop()


def push(local: LocalHerd, path: Path, tasks: list[dict[str, object]]) -> str:
    path.write_text(json.dumps({"tasks": tasks}))
    done = herder(local.env(), "push", str(path), "--json")
    return str(json.loads(done.stdout)["job_id"])


def wait(local: LocalHerd, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "herder", "wait", *args],
        env={**local.env(), "COLUMNS": "100", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_wait_shows_counts_by_state_and_an_eta(local: LocalHerd, tmp_path: Path) -> None:
    job = push(
        local,
        tmp_path / "slow.json",
        [{"name": f"s{i}", "run": ["sleep", "0.5"]} for i in range(6)],
    )
    # an interactive terminal, so the bar is redrawn as the job moves
    done = wait(local, job, TTY_INTERACTIVE="1", TTY_COMPATIBLE="1", NO_COLOR="1")
    assert done.returncode == 0, done.stderr
    assert "running 2" in done.stderr  # two slots busy while the rest wait
    assert "succeeded 6" in done.stderr
    assert "6/6" in done.stderr
    assert "eta" in done.stderr
    assert done.stdout.strip() == f"job {job}: succeeded 6"


def test_wait_exits_1_and_counts_the_failure(local: LocalHerd, tmp_path: Path) -> None:
    job = push(
        local,
        tmp_path / "mixed.json",
        [
            {"name": "good", "run": ["true"]},
            {"name": "bad", "run": "exit 4", "retries": 0},
        ],
    )
    done = wait(local, job)
    assert done.returncode == 1
    assert "succeeded 1 · failed 1" in done.stderr  # the bar's last state
    assert done.stdout.strip() == f"job {job}: succeeded 1 · failed 1"
    as_json = wait(local, job, "--json")
    assert as_json.returncode == 1
    summary = json.loads(as_json.stdout)
    assert summary["counts"] == {"succeeded": 1, "failed": 1}
    assert summary["finished"] is True


def test_wait_without_a_job_follows_the_newest(local: LocalHerd, tmp_path: Path) -> None:
    job = push(local, tmp_path / "one.json", [{"name": "one", "run": ["true"]}])
    done = wait(local)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"job {job}: succeeded 1"
