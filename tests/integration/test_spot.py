"""Agents on cloud machines: a spot interruption notice, and an orphan that shuts its machine down.

The instance metadata service is served by the test (IMDSv2: a token, then
404 until the test posts a notice); the coordinator and the agents are real
processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest

from herder.agent.spot import SpotWatcher
from herder.local import LocalHerd
from tests.helpers import db_rows, free_port, herder, kill_tree, wait_for


class FakeIMDS:
    """EC2's instance metadata service, as much of it as the spot watcher reads."""

    def __init__(self, *, imdsv1: bool = False) -> None:
        self.imdsv1 = imdsv1  # no tokens: PUT refused, reads without a token answered
        self.token = "imds-token-" + uuid.uuid4().hex
        self.notice: dict[str, str] | None = None
        self.reads = 0
        self.unauthorized = 0
        imds = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if imds.imdsv1:
                    self._answer(403, b"", "text/plain")
                elif self.path == "/latest/api/token" and self.headers.get(
                    "X-aws-ec2-metadata-token-ttl-seconds"
                ):
                    self._answer(200, imds.token.encode(), "text/plain")
                else:
                    self._answer(400, b"", "text/plain")

            def do_GET(self) -> None:
                if not imds.imdsv1 and self.headers.get("X-aws-ec2-metadata-token") != imds.token:
                    imds.unauthorized += 1
                    self._answer(401, b"", "text/plain")
                    return
                if self.path != "/latest/meta-data/spot/instance-action":
                    self._answer(404, b"", "text/plain")
                    return
                imds.reads += 1
                notice = imds.notice
                if notice is None:
                    self._answer(404, b"<?xml version='1.0'?><Error>Not Found</Error>", "text/xml")
                else:
                    self._answer(200, json.dumps(notice).encode(), "application/json")

            def _answer(self, code: int, body: bytes, kind: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def post_notice(self) -> None:
        in_two_minutes = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
        self.notice = {"action": "terminate", "time": in_two_minutes}


@pytest.fixture
def imds() -> Iterator[FakeIMDS]:
    service = FakeIMDS()
    service.thread.start()
    try:
        yield service
    finally:
        service.server.shutdown()
        service.server.server_close()
        service.thread.join(10)


def _start_agent(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "herder", "agent", *args],
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _kill(proc: subprocess.Popen[bytes]) -> None:
    kill_tree(proc.pid)
    proc.wait(10)


def _nodes(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in json.loads(herder(env, "nodes", "--json").stdout)}


def _marked(marker: str) -> list[psutil.Process]:
    """Processes of the tasks started with this marker in their environment."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("HERDER_TEST_MARKER") == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_a_spot_notice_hands_every_lease_back_uncharged_and_the_agent_leaves(
    tmp_path: Path, imds: FakeIMDS
) -> None:
    home = tmp_path / "home"
    marker = uuid.uuid4().hex
    local = LocalHerd(nodes=0, home=home)
    with local as herd:
        env = local.env()
        env["HERDER_JOIN"] = herder(env, "token").stdout.strip()
        agent = _start_agent(
            env,
            tmp_path / "agent.log",
            "--node-id",
            "spot-1",
            "--slots",
            "2",
            "--prefetch",
            "2",
            "--metadata-url",
            imds.url,
            "--spot-poll-s",
            "0.2",
        )
        try:
            tasks = [
                herd.command(["sleep", "30"], env={"HERDER_TEST_MARKER": marker}).task_id
                for _ in range(4)
            ]

            def held() -> bool:
                rows = db_rows(home, "SELECT state, node_id FROM tasks")
                running = [r for r in rows if r == ("running", "spot-1")]
                leased = [r for r in rows if r == ("leased", "spot-1")]
                return len(running) == 2 and len(leased) == 2

            wait_for(held, 30, "two tasks running and two queued on the agent")
            wait_for(lambda: len(_marked(marker)) >= 2, 15, "the sleeps to run")
            before = dict(db_rows(home, "SELECT id, attempt FROM tasks"))
            assert set(before.values()) == {1}
            assert imds.reads >= 1
            assert imds.unauthorized == 0  # every read carried the IMDSv2 token

            imds.post_notice()
            noticed = time.monotonic()
            code = agent.wait(timeout=15)
            left_after = time.monotonic() - noticed
        finally:
            _kill(agent)
        log = (tmp_path / "agent.log").read_text()
        assert code == 0, log
        assert left_after < 5, left_after
        assert "spot interruption notice (terminate at" in log
        assert not _marked(marker), "the running tasks were killed"

        def requeued() -> dict[str, tuple[str, int]]:
            rows = db_rows(home, "SELECT id, state, attempt FROM tasks")
            return {tid: (state, attempt) for tid, state, attempt in rows}

        # back in the queue at once (not after the lease), and no attempt charged
        wait_for(
            lambda: {s for s, _ in requeued().values()} == {"ready"}, 5, "the tasks to be ready"
        )
        assert requeued() == {tid: ("ready", 0) for tid in tasks}
        node = _nodes(env)["spot-1"]
        assert node["reason"] == "spot interruption", node
        story = db_rows(
            home,
            "SELECT action, json_extract(data, '$.reason') FROM events "
            "WHERE node_id = 'spot-1' AND action LIKE 'node_%' ORDER BY id",
        )
        assert ("node_terminated", "spot interruption") in story, story


def test_an_unreachable_metadata_service_is_logged_once_and_never_stops_the_agent(
    tmp_path: Path,
) -> None:
    local = LocalHerd(nodes=0, home=tmp_path / "home")
    with local as herd:
        env = local.env()
        env["HERDER_JOIN"] = herder(env, "token").stdout.strip()
        log = tmp_path / "agent.log"
        agent = _start_agent(
            env,
            log,
            "--node-id",
            "no-imds",
            "--metadata-url",
            f"http://127.0.0.1:{free_port()}",
            "--spot-poll-s",
            "0.1",
        )
        try:
            assert herd.command(["true"]).result(timeout=30)["returncode"] == 0
            time.sleep(1)  # ten polls or so
            assert agent.poll() is None
        finally:
            _kill(agent)
        lines = [ln for ln in log.read_text().splitlines() if "instance metadata" in ln]
        assert len(lines) == 1, lines
        assert "unavailable" in lines[0]


def test_an_orphaned_agent_runs_the_shutdown_command_only_when_asked(tmp_path: Path) -> None:
    local = LocalHerd(nodes=0, home=tmp_path / "home")
    local.start()
    agents: list[subprocess.Popen[bytes]] = []
    try:
        env = local.env()
        env["HERDER_JOIN"] = herder(env, "token").stdout.strip()
        for name, action in (("orphan-shutdown", "shutdown"), ("orphan-exit", "exit")):
            marker = tmp_path / f"{name}.shutdown"
            agent_env = {**env, "HERDER_SHUTDOWN_COMMAND": f"touch {marker}"}
            agents.append(
                _start_agent(
                    agent_env,
                    tmp_path / f"{name}.log",
                    "--node-id",
                    name,
                    "--orphan-after",
                    "1",
                    "--orphan-action",
                    action,
                )
            )
        wait_for(
            lambda: {"orphan-shutdown", "orphan-exit"} <= _nodes(env).keys(),
            30,
            "both agents to pair",
        )
        local.kill()
        killed = time.monotonic()
        codes = [a.wait(timeout=15) for a in agents]
        assert time.monotonic() - killed < 8
    finally:
        for agent in agents:
            _kill(agent)
        local.stop()
    assert codes == [0, 0]
    assert (tmp_path / "orphan-shutdown.shutdown").exists()
    assert not (tmp_path / "orphan-exit.shutdown").exists()
    log = (tmp_path / "orphan-shutdown.log").read_text()
    assert f"shutting the machine down: touch {tmp_path}/orphan-shutdown.shutdown" in log
    assert os.path.getsize(tmp_path / "orphan-shutdown.shutdown") == 0


async def test_the_watcher_renews_an_expired_token_and_speaks_imdsv1_too() -> None:
    for service in (FakeIMDS(), FakeIMDS(imdsv1=True)):
        service.thread.start()
        try:
            watcher = SpotWatcher(service.url, poll_s=0.01)
            assert await watcher.poll() is None
            service.token = "renewed-" + uuid.uuid4().hex  # the old token is refused now
            assert await watcher.poll() is None  # 401: drops the token
            assert await watcher.poll() is None  # a new token, then 404
            service.post_notice()
            notice = await asyncio.wait_for(watcher.wait_notice(), 10)
            assert notice.action == "terminate"
            assert notice.time.endswith("Z")
            # IMDSv2: the read with the old token was refused once, then renewed
            assert (service.reads, service.unauthorized) == ((4, 0) if service.imdsv1 else (3, 1))
        finally:
            service.server.shutdown()
            service.server.server_close()
            service.thread.join(10)
