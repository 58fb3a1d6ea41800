"""Several coordinators on one store, as real processes: for tests and bench/coordinators.py.

Every coordinator gets a herder home of its own (its log, its
``coordinator.json``) holding copies of one cluster secret and one CA, as
README's "Several coordinators" section tells users to do; agents are
``herder agent --join TOKEN@URL`` processes, each joined to one coordinator.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from herder import certs, security
from tests.helpers import free_port, kill_tree, wait_for


def shared_homes(root: Path, count: int, toml: str = "") -> list[Path]:
    """``count`` herder homes sharing the secret and CA of the first."""
    first = root / "home0"
    security.load_or_create_secret(first / "secret")
    certs.ensure_tls(first / "tls", ["127.0.0.1"])
    homes = [first]
    for i in range(1, count):
        home = root / f"home{i}"
        (home / "tls").mkdir(parents=True, mode=0o700)
        home.chmod(0o700)
        shutil.copy2(first / "secret", home / "secret")
        for name in ("ca.pem", "ca.key"):
            shutil.copy2(first / "tls" / name, home / "tls" / name)
        homes.append(home)
    for home in homes:
        (home / "herder.toml").write_text(toml)
    return homes


def join_token(home: Path, url: str) -> str:
    secret = security.load_secret(home / "secret")
    fingerprint = security.ca_fingerprint((home / "tls" / "ca.pem").read_bytes())
    return security.JoinToken(secret, fingerprint, url).encode()


class Coordinators:
    """``herder up`` processes on one store, and agents joined to them."""

    def __init__(self, root: Path, store: str, count: int, *, toml: str = "") -> None:
        self.root = root
        self.store = store
        self.homes = shared_homes(root, count, toml)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * count
        self.urls: list[str] = [""] * count
        self.agents: list[tuple[int, subprocess.Popen[bytes]]] = []

    def env(self, i: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERDER_")}
        env["HERDER_HOME"] = str(self.homes[i])
        return env

    def start(self, *indices: int) -> list[str]:
        """Start these coordinators together; their URLs once each is ready."""
        for i in indices:
            self._launch(i)
        for i in indices:
            self.urls[i] = wait_for(
                lambda i=i: self._recorded(i), 90, f"coordinator {i} to be ready", every=0.1
            )
        return [self.urls[i] for i in indices]

    def _launch(self, i: int) -> None:
        home = self.homes[i]
        with open(home / "coordinator.log", "ab") as log:
            self.procs[i] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "herder",
                    "up",
                    "--store",
                    self.store,
                    "--listen",
                    f"127.0.0.1:{free_port()}",
                    "--no-beacon",
                    "--parent-pid",
                    str(os.getpid()),
                ],
                env=self.env(i),
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def _recorded(self, i: int) -> str | None:
        proc = self.procs[i]
        assert proc is not None
        if proc.poll() is not None:
            raise AssertionError(f"coordinator {i} exited: {self.log(i)[-2000:]}")
        try:
            data = json.loads((self.homes[i] / "coordinator.json").read_text())
        except (OSError, ValueError):
            return None
        return str(data["url"]) if data.get("pid") == proc.pid else None

    def start_agent(self, i: int, slots: int) -> subprocess.Popen[bytes]:
        """An agent joined to coordinator ``i`` (its log in that coordinator's home)."""
        env = self.env(i)
        n = len(self.agents)
        env["HERDER_HOME"] = str(self.root / f"agent{n}")
        with open(self.homes[i] / f"agent{n}.log", "ab") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "herder",
                    "agent",
                    "--join",
                    join_token(self.homes[i], self.urls[i]),
                    "--slots",
                    str(slots),
                    "--node-id",
                    f"n{n}-c{i}",
                ],
                env=env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.agents.append((i, proc))
        return proc

    def kill(self, i: int) -> None:
        """kill -9 coordinator ``i`` (its agents live on)."""
        proc = self.procs[i]
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)

    def log(self, i: int) -> str:
        return (self.homes[i] / "coordinator.log").read_text(errors="replace")

    def close(self) -> None:
        for _, agent in self.agents:
            kill_tree(agent.pid)
            agent.wait(10)
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                kill_tree(proc.pid)
                proc.wait(10)


@contextmanager
def coordinators(root: Path, store: str, count: int, *, toml: str = "") -> Iterator[Coordinators]:
    group = Coordinators(root, store, count, toml=toml)
    try:
        yield group
    finally:
        group.close()


def pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of a query on a PostgreSQL store (the checker's view, not the API's)."""
    import asyncpg

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return [tuple(r) for r in await conn.fetch(sql, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def wait_nodes(url: str, count: int, timeout: float = 60) -> None:
    """Until ``count`` nodes are ready or busy in the store."""

    def ready() -> bool:
        rows = pg_rows(url, "SELECT count(*) FROM nodes WHERE state IN ('ready', 'busy')")
        return bool(rows[0][0] >= count)

    wait_for(ready, timeout, f"{count} nodes ready", every=0.2)


def seconds_since(t0: float) -> float:
    return time.time() - t0
