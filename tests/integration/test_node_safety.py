"""On the node: argv reaches the program verbatim (no shell), per-task limits hold,
run_as switches user and drops the agent's groups, secret variables are passed but
never shown; and the coordinator never unpickles what passes through it."""

from __future__ import annotations

import hashlib
import os
import pickle
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from herder.client import Client
from herder.errors import TaskError
from herder.local import LocalHerd


@pytest.fixture(scope="module")
def herd() -> Iterator[tuple[LocalHerd, Client]]:
    h = LocalHerd(nodes=1, slots=2)
    client = h.start()
    try:
        h.wait_nodes(1)
        yield h, client
    finally:
        h.stop()


def stdout_of(client: Client, task_id: str) -> str:
    out: str = client.task(task_id)["task"]["output"]["stdout_tail"]
    return out


def test_shell_metacharacters_in_argv_reach_the_program_verbatim(
    herd: tuple[LocalHerd, Client], tmp_path: Path
) -> None:
    _, client = herd
    marker = tmp_path / "pwned"
    nasty = f"; touch {marker} && echo $(id) `uname` | cat > /dev/null & *"
    fut = client.command([sys.executable, "-c", "import sys; print(repr(sys.argv[1]))", nasty])
    fut.result(timeout=30)
    assert stdout_of(client, fut.task_id).strip() == repr(nasty)
    assert not marker.exists()


def test_limits_hold_memory_cpu_and_open_files(herd: tuple[LocalHerd, Client]) -> None:
    _, client = herd
    hog = client.command(
        [sys.executable, "-c", "x = bytearray(400 * 2**20); print('allocated')"],
        limits={"memory_mb": 200},
        retries=0,
    )
    with pytest.raises(TaskError):
        hog.result(timeout=60)
    assert "MemoryError" in client.task(hog.task_id)["task"]["error"]["traceback"]
    spin = client.command(
        [sys.executable, "-c", "while True: pass"], limits={"cpu_s": 1}, retries=0
    )
    with pytest.raises(TaskError):
        spin.result(timeout=60)
    task = client.task(spin.task_id)["task"]
    assert task["reason"] == "exit code"
    assert task["output"]["returncode"] < 0  # killed by a signal (SIGXCPU or SIGKILL)
    files = client.command(
        [sys.executable, "-c",
         "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
        limits={"open_files": 64},
    )  # fmt: skip
    files.result(timeout=30)
    assert stdout_of(client, files.task_id).strip() == "64"
    free = client.command([sys.executable, "-c", "x = bytearray(300 * 2**20); print('ok')"])
    free.result(timeout=60)  # without limits the same allocation is fine


def test_run_as_switches_user_and_drops_the_agents_groups(
    herd: tuple[LocalHerd, Client],
) -> None:
    _, client = herd
    if os.geteuid() != 0:
        if os.environ.get("HERDER_REQUIRE_ROOT") == "1":
            pytest.fail("run_as needs the agent to run as root (HERDER_REQUIRE_ROOT=1)")
        pytest.skip("run_as needs the agent to run as root")
    nobody = pwd.getpwnam("nobody")
    fut = client.command(
        ["sh", "-c", "id -u; id -g; id -G; echo hello > out.txt; cat out.txt"], run_as="nobody"
    )
    fut.result(timeout=30)
    lines = stdout_of(client, fut.task_id).split()
    assert lines[:2] == [str(nobody.pw_uid), str(nobody.pw_gid)]
    assert "0" not in lines[2:-1]  # root's groups are gone
    assert lines[-1] == "hello"  # its scratch directory is its own
    ghost = client.command(["true"], run_as="no-such-user-x", retries=0)
    with pytest.raises(TaskError, match="no user 'no-such-user-x'"):
        ghost.result(timeout=30)


def test_secret_variables_are_passed_but_never_shown(herd: tuple[LocalHerd, Client]) -> None:
    h, client = herd
    secret = "s3cr3t-value-9f2c"
    fut = client.command(
        ["sh", "-c", 'echo "${#API_KEY} $(echo "$API_KEY" | sha256sum | cut -c1-16)"'],
        env={"API_KEY": secret, "MODE": "plain"},
        secret_env=["API_KEY"],
    )
    fut.result(timeout=30)
    digest = hashlib.sha256((secret + "\n").encode()).hexdigest()[:16]
    assert stdout_of(client, fut.task_id).split() == [str(len(secret)), digest]
    shown = client.task(fut.task_id)["task"]["command"]["env"]
    assert shown == {"API_KEY": "***", "MODE": "plain"}
    assert all(secret not in str(t) for t in client.tasks(limit=1000))
    listing = subprocess.run(
        [sys.executable, "-m", "herder", "task", fut.task_id],
        env=h.env(), capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert secret not in listing
    logs = "".join(p.read_text(errors="replace") for p in h.home.rglob("*.log"))
    assert secret not in logs


class Canary:
    """Unpickling this runs code: it would leave a file where the coordinator runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_the_coordinator_never_unpickles_what_passes_through_it(
    herd: tuple[LocalHerd, Client], tmp_path: Path
) -> None:
    """A payload whose unpickling would run code goes through submit, storage, dispatch
    and a failure on the node, and is never unpickled by the coordinator."""
    _, client = herd
    marker = tmp_path / "coordinator-unpickled"
    from herder.model import TaskSpec

    spec = TaskSpec(
        id="t-canary",
        kind="call",
        payload=pickle.dumps(Canary(str(marker))),
        max_attempts=1,
    )
    client.wait(client.push([spec]))
    # the agent unpickled it (it runs code by design); the coordinator did not: the
    # node's run created the marker only if the agent ran it, so compare the processes
    agent_ran = marker.exists()
    assert client.task("t-canary")["task"]["state"] in ("failed", "succeeded")
    # the same canary through the coordinator again, where no node may take it
    marker.unlink(missing_ok=True)
    spec2 = spec.model_copy(update={"id": "t-canary-2", "select": 'node == "nowhere"'})
    client.push([spec2])
    try:
        assert client.task("t-canary-2")["task"]["state"] == "ready"
        client.tasks(limit=1000)  # the read paths over it
        assert not marker.exists()
    finally:
        client.cancel("t-canary-2")
    assert agent_ran  # the canary does work where it is meant to be unpickled
