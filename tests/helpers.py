"""Small helpers for tests that run real herds: reading the store, waiting, finding processes."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def db_rows(home: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the herd's SQLite store directly (the checker's view, not the API's)."""
    conn = sqlite3.connect(home / "herd.db", timeout=10)
    try:
        return list(conn.execute(sql, args))
    finally:
        conn.close()


def succeeded_attempts(home: Path) -> dict[str, int]:
    """task id -> number of attempts recorded as succeeded (must be exactly 1)."""
    rows = db_rows(
        home, "SELECT task_id, count(*) FROM attempts WHERE outcome='succeeded' GROUP BY task_id"
    )
    return {tid: n for tid, n in rows}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def kill_tree(pid: int) -> None:
    """kill -9 a process and everything under it (test cleanup)."""
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for proc in [*parent.children(recursive=True), parent]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def recorded_agents(home: Path) -> dict[str, int]:
    """Node id: pid of the agents the local provider recorded in this herd home."""
    import json

    try:
        recorded = json.loads((home / "local-agents.json").read_text())
    except (OSError, ValueError):
        return {}
    return {node: entry["pid"] for node, entry in recorded.items()}


def agent_pids(home: Path) -> list[int]:
    """Pids of agents started for this herd home (by the local provider)."""
    return [pid for pid in recorded_agents(home).values() if psutil.pid_exists(pid)]


def herder(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the ``herder`` command as a user would; fail the test if it fails (unless told)."""
    done = subprocess.run(
        [sys.executable, "-m", "herder", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"herder {' '.join(args)} failed: {done.stdout}{done.stderr}")
    return done


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at ``mount_point`` (root only), for disk-full tests.

    Without root the test is skipped, unless HERDER_REQUIRE_ROOT=1 (CI) makes
    that a failure.
    """
    import pytest

    mount_point.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode:
        reason = f"cannot mount a {size} tmpfs (needs root): {done.stderr.strip()}"
        if os.environ.get("HERDER_REQUIRE_ROOT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True, timeout=30)


@contextlib.contextmanager
def started_herd(nodes: int, *, slots: int = 1) -> Iterator[Any]:
    """A LocalHerd with ``nodes`` agents ready (module fixtures share one)."""
    from herder.local import LocalHerd

    proc = LocalHerd(nodes=nodes, slots=slots)
    proc.start()
    try:
        proc.wait_nodes()
        yield proc
    finally:
        proc.stop()
