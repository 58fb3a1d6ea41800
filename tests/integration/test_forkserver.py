"""Local agents forked from ``herder.forkserver``, and what happens without it."""

from __future__ import annotations

import asyncio
import json
import operator
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from herder.local import LocalHerd
from herder.providers.local import LocalProvider
from tests.helpers import agent_pids, kill_tree, wait_for


def test_local_agents_are_forks_of_the_fork_server(tmp_path: Path) -> None:
    herd = LocalHerd(nodes=2, home=tmp_path)
    client = herd.start()
    try:
        herd.wait_nodes(2, timeout=60)
        assert herd.process is not None
        pids = agent_pids(tmp_path)
        assert len(pids) == 2
        for pid in pids:
            agent = psutil.Process(pid)
            server = agent.parent()
            assert server is not None
            assert "herder.forkserver" in server.cmdline(), server.cmdline()
            assert server.ppid() == herd.process.pid
            assert os.getpgid(pid) == pid  # a session of its own, as an exec'd agent
            # the join token is in neither its argv nor the environment it started with
            assert "--join" not in agent.cmdline()
            assert "HERDER_JOIN" not in Path(f"/proc/{pid}/environ").read_text()
        assert client.submit(operator.pos, 3).result(timeout=60) == 3
    finally:
        herd.stop()


def test_without_its_fork_server_a_dead_agent_is_replaced_by_a_new_process(
    tmp_path: Path,
) -> None:
    herd = LocalHerd(nodes=2, home=tmp_path)
    client = herd.start()
    try:
        herd.wait_nodes(2, timeout=60)
        first, other = agent_pids(tmp_path)
        server = psutil.Process(first).parent()
        assert server is not None
        assert "herder.forkserver" in server.cmdline()
        server.kill()
        kill_tree(first)
        # The other agent lives on. Had it kept the server's end of the socket
        # open, the provider would wait out its 30 s answer timeout to notice.
        started = time.monotonic()
        second = wait_for(
            lambda: [p for p in agent_pids(tmp_path) if p not in (first, other)],
            60,
            "a replacement agent",
        )[0]
        assert time.monotonic() - started < 20
        agent = psutil.Process(second)
        assert herd.process is not None
        assert agent.ppid() == herd.process.pid
        assert "agent" in agent.cmdline()  # python -m herder agent ...
        herd.wait_nodes(2, timeout=60)
        assert client.submit(operator.pos, 4).result(timeout=60) == 4
        log = (tmp_path / "coordinator.log").read_text()
        assert "local agents start as new processes from now on" in log
    finally:
        herd.stop()


def test_the_fork_server_answers_bad_requests_and_leaves_no_zombie(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    server = subprocess.Popen(
        [sys.executable, "-m", "herder.forkserver", str(theirs.fileno())],
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    ours.settimeout(60)
    answers = ours.makefile("rb")

    def ask(request: bytes) -> dict[str, object]:
        ours.sendall(request + b"\n")
        answer: dict[str, object] = json.loads(answers.readline())
        return answer

    try:
        assert "not a JSON request" in str(ask(b"{nope")["error"])
        assert ask(b"[1, 2]") == {"error": "a request is a JSON object"}
        assert "'argv' must be a list" in str(
            ask(b'{"argv": "agent", "env": {}, "log": "x"}')["error"]
        )
        log = tmp_path / "child.log"
        env = {"PATH": os.environ["PATH"], "HERDER_HOME": str(tmp_path)}
        pid = ask(json.dumps({"argv": ["--help"], "env": env, "log": str(log)}).encode())["pid"]
        assert isinstance(pid, int)

        # a zombie would still exist: gone means it exited and was reaped
        wait_for(lambda: not psutil.pid_exists(pid), 30, "the child to exit and be reaped")
        assert "Usage" in log.read_text()
    finally:
        answers.close()
        ours.close()  # the server leaves when its socket closes
        assert server.wait(30) == 0


def test_an_agent_is_adopted_only_if_its_pid_still_names_the_same_process(
    tmp_path: Path,
) -> None:
    """The registry's start time tells a recorded agent from a later process
    that was given its pid (a forked agent's command line is its server's)."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        started = psutil.Process(sleeper.pid).create_time()
        registry = tmp_path / "local-agents.json"

        def adopted(recorded_start: float) -> list[str]:
            registry.write_text(
                json.dumps({"n-1": {"pid": sleeper.pid, "started": recorded_start}})
            )
            provider = LocalProvider(env={})
            provider.attach(cluster="c", home=tmp_path)
            return [h.node_id for h in asyncio.run(provider.list_own())]

        assert adopted(started) == ["n-1"]
        assert adopted(started - 5.0) == []  # another process, long gone, had that pid
        registry.write_text(json.dumps({"n-1": sleeper.pid}))  # an older herder's registry
        provider = LocalProvider(env={})
        provider.attach(cluster="c", home=tmp_path)
        assert asyncio.run(provider.list_own()) == []
    finally:
        os.killpg(sleeper.pid, signal.SIGKILL)
        sleeper.wait()
