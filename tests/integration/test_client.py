"""The Python client against a real herd: a coordinator process and local agents."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import herder
from herder import certs, security
from herder.client import AsyncClient, RemoteTraceback
from herder.config import home_ca_path
from herder.errors import SubmissionError, TaskCancelled, TaskError, TaskTimeout
from herder.local import LocalHerd
from tests.helpers import (
    agent_pids,
    db_rows,
    kill_tree,
    started_herd,
    succeeded_attempts,
    wait_for,
)


@pytest.fixture(scope="module")
def herd_proc() -> Iterator[LocalHerd]:
    with started_herd(2, slots=2) as proc:
        yield proc


@pytest.fixture
def herd(herd_proc: LocalHerd) -> herder.Client:
    assert herd_proc.client is not None
    return herd_proc.client


class Boom(Exception):
    """A user exception type that must come back as itself."""


def fail_with_boom(x: int) -> None:
    raise Boom(f"boom {x}")


def test_submit_returns_the_result(herd: herder.Client) -> None:
    assert herd.submit(pow, 2, 10).result(timeout=30) == 1024


def test_map_keeps_order_across_batches(herd: herder.Client) -> None:
    assert herd.map(lambda x: x * x, range(2500), batch_size=1000) == [x * x for x in range(2500)]


def test_lambdas_and_closures_work(herd: herder.Client) -> None:
    offset = 7

    def shifted(x: int) -> int:
        return x + offset

    assert herd.submit(shifted, 1).result(timeout=30) == 8
    assert herd.submit(lambda: offset * 6).result(timeout=30) == 42


def test_a_future_argument_is_a_dependency(herd: herder.Client, herd_proc: LocalHerd) -> None:
    f = herd.submit(pow, 2, 10)
    g = herd.submit(lambda a, b: a + b, f, 1)
    h = herd.submit(lambda xs: sum(xs), [f, g])
    assert h.result(timeout=30) == 1024 + 1025
    detail = herd.task(g.task_id)
    assert detail["task"]["depends_on"] == [f.task_id]


def test_dependency_by_task_id(herd: herder.Client) -> None:
    first = herd.command(["sh", "-c", "sleep 0.2; echo one"])
    second = herd.command(["echo", "two"], depends_on=[first.task_id])
    assert second.result(timeout=30)["stdout_tail"] == "two\n"
    a = herd.task(first.task_id)["task"]
    b = herd.task(second.task_id)["task"]
    assert b["started_at"] >= a["finished_at"]


def test_unknown_dependency_is_refused_and_nothing_stored(herd: herder.Client) -> None:
    before = herd.status()["counts"]
    with pytest.raises(SubmissionError, match="t-nonexistent"):
        herd.command(["true"], depends_on=["t-nonexistent"])
    assert herd.status()["counts"] == before


def test_exception_comes_back_with_its_type_and_remote_traceback(herd: herder.Client) -> None:
    f = herd.submit(fail_with_boom, 3, retries=0)
    with pytest.raises(Boom, match="boom 3") as info:
        f.result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_with_boom" in info.value.__cause__.tb


def test_failed_dependency_fails_dependents(herd: herder.Client) -> None:
    bad = herd.submit(fail_with_boom, 1, retries=0)
    child = herd.submit(lambda x: x, bad)
    with pytest.raises(herder.DependencyFailed):
        child.result(timeout=30)
    assert herd.task(child.task_id)["task"]["reason"] == "dependency failed"


def test_retries_run_the_task_again(herd: herder.Client, tmp_path: Path) -> None:
    marker = tmp_path / "tries"

    def flaky() -> int:
        with open(marker, "a") as fh:
            fh.write("x")
        if len(marker.read_text()) < 3:
            raise RuntimeError("not yet")
        return len(marker.read_text())

    assert herd.submit(flaky, retries=2).result(timeout=30) == 3
    f = herd.submit(fail_with_boom, 0, retries=1)
    with pytest.raises(Boom):
        f.result(timeout=30)
    assert len(herd.task(f.task_id)["attempts"]) == 2


def test_command_output_and_failure(herd: herder.Client) -> None:
    out = herd.command(["sh", "-c", "echo out; echo err >&2"]).result(timeout=30)
    assert out["returncode"] == 0
    assert out["stdout_tail"] == "out\n"
    assert out["stderr_tail"] == "err\n"
    failing = herd.command("echo bad >&2; exit 3", retries=0)
    with pytest.raises(TaskError, match="exited with code 3") as info:
        failing.result(timeout=30)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "bad" in info.value.__cause__.tb


def test_argv_reaches_the_program_verbatim(herd: herder.Client) -> None:
    tricky = "$(touch /tmp/pwned); `id` && echo; 'quoted' \"double\" *"
    out = herd.command(["printf", "%s", tricky]).result(timeout=30)
    assert out["stdout_tail"] == tricky


def _processes_with(marker: str) -> list[psutil.Process]:
    """Processes carrying HERDER_TEST_MARKER=marker in their environment (children inherit it)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HERDER_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_timeout_kills_the_whole_process_group(herd: herder.Client) -> None:
    marker = f"herder-timeout-{uuid.uuid4().hex}"
    f = herd.command(
        ["sh", "-c", "sleep 300 & sleep 300; wait"],
        env={"HERDER_TEST_MARKER": marker},
        timeout=2,
        retries=0,
    )
    wait_for(lambda: len(_processes_with(marker)) >= 3, 15, "the task and its children to start")
    with pytest.raises(TaskTimeout):
        f.result(timeout=30)
    wait_for(lambda: not _processes_with(marker), 5, "the timed-out processes to be gone")
    assert herd.task(f.task_id)["task"]["reason"] == "timeout"


def test_cancel_kills_a_running_task(herd: herder.Client) -> None:
    marker = f"herder-cancel-{uuid.uuid4().hex}"
    f = herd.command(["sleep", "300"], env={"HERDER_TEST_MARKER": marker}, retries=0)
    wait_for(lambda: _processes_with(marker), 15, "the task to start")
    assert herd.cancel(f) == [f.task_id]
    with pytest.raises(TaskCancelled):
        f.result(timeout=30)
    wait_for(lambda: not _processes_with(marker), 5, "the cancelled process to be gone")
    assert herd.task(f.task_id)["task"]["state"] == "cancelled"


def test_cancel_a_waiting_task_and_its_dependents(herd: herder.Client) -> None:
    gate = herd.command(["sleep", "1"])
    waiting = herd.command(["true"], depends_on=[gate])
    child = herd.command(["true"], depends_on=[waiting])
    herd.cancel(waiting)
    with pytest.raises(TaskCancelled):
        waiting.result(timeout=30)
    with pytest.raises(herder.DependencyFailed):
        child.result(timeout=30)
    gate.result(timeout=30)


def test_priorities_order_the_queue(tmp_path: Path) -> None:
    """With the only slot busy, the highest priority waiting task runs first."""
    env = {**os.environ, "HERDER_PREFETCH": "0"}  # nothing queued on the node itself
    with LocalHerd(nodes=1, slots=1, home=tmp_path, env=env) as herd:
        blocker = herd.command(["sleep", "1"])
        wait_for(lambda: herd.task(blocker.task_id)["task"]["state"] == "running", 15, "start")
        low = herd.command(["true"], priority=-5)
        mid = herd.command(["true"])
        high = herd.command(["true"], priority=50)
        for f in (blocker, low, mid, high):
            f.result(timeout=60)
        started = dict(
            db_rows(
                tmp_path,
                "SELECT id, started_at FROM tasks WHERE id IN (?, ?, ?)",
                low.task_id,
                mid.task_id,
                high.task_id,
            )
        )
        assert started[high.task_id] < started[mid.task_id] < started[low.task_id]


def test_each_result_is_recorded_once(herd: herder.Client, herd_proc: LocalHerd) -> None:
    herd.map(abs, range(300))
    counts = succeeded_attempts(herd_proc.home)
    assert counts
    assert max(counts.values()) == 1


def test_a_dropped_future_still_runs_and_can_be_watched_again(herd: herder.Client) -> None:
    """Dropping a future stops its outcome being sent, not its task: the task runs,
    its result is stored, and ``future(task_id)`` asks for it again."""
    job = f"j-{uuid.uuid4().hex[:12]}"
    dropped = [herd.submit(pow, 2, i, job=job).task_id for i in range(20)]  # no future kept
    kept = herd.submit(pow, 3, 2, job=job)
    assert kept.result(timeout=30) == 9
    wait_for(lambda: herd.job(job)["counts"].get("succeeded") == 21, 30, "every task to run")
    assert [herd.future(t).result(timeout=30) for t in dropped] == [2**i for i in range(20)]


def test_async_client(herd_proc: LocalHerd) -> None:
    async def main() -> tuple[int, list[int]]:
        client = await AsyncClient.open(env=herd_proc.env())
        async with client:
            one = await client.submit(pow, 3, 3)
            many = await asyncio.gather(*(client.submit(abs, -i) for i in range(50)))
            return one, list(many)

    one, many = asyncio.run(main())
    assert one == 27
    assert many == list(range(50))


def test_connect_reads_url_and_token_from_the_environment(herd_proc: LocalHerd) -> None:
    import subprocess
    import sys

    token = subprocess.run(
        [sys.executable, "-m", "herder", "token"],
        env=herd_proc.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert "@https://127.0.0.1:" in token
    env = {
        "HERDER_TOKEN": token,
        "HOME": os.environ.get("HOME", "/root"),
        "HERDER_HOME": "/nonexistent",
    }
    with herder.connect(env=env) as other:
        assert other.submit(pow, 2, 5).result(timeout=30) == 32


def test_local_agents_are_replaced_within_5s(herd_proc: LocalHerd) -> None:
    herd = herd_proc.client
    assert herd is not None
    pids = agent_pids(herd_proc.home)
    assert len(pids) == 2
    victim = pids[0]
    os.kill(victim, 9)
    killed_at = time.monotonic()
    wait_for(
        lambda: len([p for p in agent_pids(herd_proc.home) if p != victim]) == 2,
        5,
        "a replacement agent",
    )
    herd_proc.wait_nodes(2, timeout=max(0.1, 5 - (time.monotonic() - killed_at)))
    assert herd.submit(pow, 2, 2).result(timeout=30) == 4


class _CountingForwarder(socketserver.ThreadingTCPServer):
    """127.0.0.1:<port> -> ``target``, byte for byte (TLS passes through); counts the
    connections it accepted."""

    daemon_threads = True

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.accepted = 0
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server = self.server
        assert isinstance(server, _CountingForwarder)
        server.accepted += 1
        with socket.create_connection(server.target, timeout=10) as upstream:
            ends = [self.request, upstream]
            for _ in range(100_000):  # bounded: far more frames than the test sends
                ready, _, _ = select.select(ends, [], [], 10)
                if not ready:
                    return
                for end in ready:
                    data = end.recv(65536)
                    if not data:
                        return
                    (upstream if end is self.request else self.request).sendall(data)


def test_the_homes_pinned_ca_spares_a_fetch_and_any_other_is_fetched(
    herd_proc: LocalHerd, tmp_path: Path
) -> None:
    """A client beside its coordinator takes the CA from the herder home when the pin
    matches it (one connection: the session); in a home without it, or with another CA
    there, it fetches it from /v1/ca and pins it (two connections)."""
    env = herd_proc.env()
    home = Path(env["HERDER_HOME"])
    pem = home_ca_path(env).read_bytes()
    pin = security.ca_fingerprint(pem)
    assert security.pinned_ca_at(home_ca_path(env), pin) == pem
    assert security.pinned_ca_at(home_ca_path(env), bytes(32)) is None  # another pin
    two = tmp_path / "two.pem"
    two.write_bytes(pem + pem)
    assert security.pinned_ca_at(two, pin) is None  # one certificate, or fetched

    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "tls").mkdir(parents=True)
    other_ca, _ = certs.build_ca("another herder", days=1)
    (elsewhere / "tls" / "ca.pem").write_bytes(other_ca.public_bytes(Encoding.PEM))
    parts = urllib.parse.urlsplit(herd_proc.url)
    with _CountingForwarder((str(parts.hostname), int(parts.port or 443))) as forwarder:
        threading.Thread(target=forwarder.serve_forever, daemon=True).start()
        url = f"https://127.0.0.1:{forwarder.server_address[1]}"
        token = security.JoinToken(security.load_secret(home / "secret"), pin, url).encode()
        for where, connections in ((home, 1), (elsewhere, 2), (tmp_path / "empty", 2)):
            forwarder.accepted = 0
            with herder.Client(env={"HERDER_HOME": str(where), "HERDER_TOKEN": token}) as client:
                assert client.submit(pow, 2, 5).result(timeout=30) == 32
            assert forwarder.accepted == connections, where
        forwarder.shutdown()


def _is_ready(client: herder.Client, node_id: str) -> bool:
    return any(n["id"] == node_id and n["state"] == "ready" for n in client.nodes())


def test_an_agent_beside_its_coordinator_takes_the_ca_from_the_home(
    herd_proc: LocalHerd, tmp_path: Path
) -> None:
    """A local agent pairs on one connection (its session) when the herder home holds
    the pinned CA, as a coordinator's own local nodes find it; elsewhere it fetches
    the CA first (two connections). Both pair and run a task."""
    env = herd_proc.env()
    home = Path(env["HERDER_HOME"])
    pin = security.ca_fingerprint(home_ca_path(env).read_bytes())
    parts = urllib.parse.urlsplit(herd_proc.url)
    client = herd_proc.client
    assert client is not None
    with _CountingForwarder((str(parts.hostname), int(parts.port or 443))) as forwarder:
        threading.Thread(target=forwarder.serve_forever, daemon=True).start()
        url = f"https://127.0.0.1:{forwarder.server_address[1]}"
        token = security.JoinToken(security.load_secret(home / "secret"), pin, url).encode()
        for where, connections in ((home, 1), (tmp_path / "empty", 2)):
            forwarder.accepted = 0
            node_id = f"n-ca-{connections}"
            agent_env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
            agent = subprocess.Popen(
                [sys.executable, "-m", "herder", "agent", "--join", token, "--node-id",
                 node_id, "--slots", "1", "--orphan-after", "20"],
                env={**agent_env, "HERDER_HOME": str(where)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
            try:
                wait_for(lambda nid=node_id: _is_ready(client, nid), 60, f"{node_id} to pair")
                task = client.run_on(node_id, pow, 3, 3)
                assert task.result(timeout=30) == 27
                assert forwarder.accepted == connections, where
            finally:
                kill_tree(agent.pid)
                agent.wait(timeout=30)
        forwarder.shutdown()
