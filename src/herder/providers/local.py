"""The ``local`` provider: agents as subprocesses of the coordinator's machine.

The join token reaches an agent through its environment, never its argv,
so it does not show in ``ps``. Each agent logs to ``<home>/logs/<node>.log``.

With a fork server (``herder up --local N`` starts one, see
``herder.forkserver``) an agent is a fork of a process that has imported
the agent already; without one, or if it fails, a fresh ``python -m herder
agent``.

The provider writes the agents it started to ``<home>/local-agents.json``
(node id: pid and the process's start time, which tells it from a later
process given the same pid). A coordinator restarted after a crash reads
it back and adopts the agents that still run (they reconnect by
themselves), so ``--local N`` keeps N agents, not 2N, across a kill -9 of
the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import psutil

from herder.errors import ProviderError

from .base import LaunchSpec, NodeHandle, Provider, SpawnResult
from .forks import ForkServer

log = logging.getLogger(__name__)

# An agent whose coordinator stays away this long exits (no orphans left behind).
ORPHAN_AFTER_S = 120.0


class LocalProvider(Provider):
    """Agents as local processes; ``env`` is the environment they start from,
    ``forks`` the fork server that starts them (the provider owns it now)."""

    name = "local"

    def __init__(
        self, *, env: dict[str, str] | None = None, forks: ForkServer | None = None
    ) -> None:
        self._env = dict(os.environ) if env is None else env
        self._forks = forks
        self._pids: dict[str, int] = {}
        self._started: dict[int, float] = {}  # pid: its process's start time
        self._children: dict[int, asyncio.subprocess.Process] = {}

    @property
    def _registry(self) -> Path:
        if self.home is None:
            raise ProviderError("the local provider is used before attach()", provider=self.name)
        return self.home / "local-agents.json"

    def attach(self, *, cluster: str, home: Path) -> None:
        super().attach(cluster=cluster, home=home)
        self._adopt()

    def _adopt(self) -> None:
        """Take over agents a previous coordinator in this home started, if they still run."""
        try:
            recorded = json.loads(self._registry.read_text())
        except (OSError, ValueError):
            return
        for node_id, entry in recorded.items():
            if not isinstance(entry, dict):
                continue  # an older herder's bare pid: its process cannot be told apart
            pid, started = entry.get("pid"), entry.get("started")
            if isinstance(pid, int) and started is not None and _started_at(pid) == started:
                self._pids[node_id] = pid
                self._started[pid] = started

    def _save(self) -> None:
        entries = {n: {"pid": p, "started": self._started.get(p)} for n, p in self._pids.items()}
        tmp = self._registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(entries))
        os.replace(tmp, self._registry)

    async def spawn(self, node_ids: list[str], launch: LaunchSpec) -> SpawnResult:
        logs = self._registry.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        result = SpawnResult()
        for node_id in node_ids:
            env = {**self._env, "HERDER_JOIN": launch.join}
            # Only the fleet's policy decides when its agents leave: an inherited
            # HERDER_IDLE_EXIT would have them go and be replaced forever.
            env.pop("HERDER_IDLE_EXIT", None)
            argv = [
                "agent",
                "--node-id",
                node_id,
                "--slots",
                str(launch.slots),
                "--provider",
                self.name,
                "--orphan-after",
                str(min(launch.orphan_after_s, ORPHAN_AFTER_S)),
                "--release-dir",  # one cache for the herd's local agents: installed once
                str(self._registry.parent / "releases"),
                *(arg for k, v in launch.labels.items() for arg in ("--label", f"{k}={v}")),
            ]
            log_path = logs / f"{node_id}.log"
            try:
                pid = await self._fork(argv, env, log_path) or await self._exec(argv, env, log_path)
            except OSError as exc:
                result.failed[node_id] = f"could not start {sys.executable}: {exc}"
                continue
            self._pids[node_id] = pid
            started = _started_at(pid)
            if started is not None:  # else it is gone already; reap() will say so
                self._started[pid] = started
            result.started.append(
                NodeHandle(node_id=node_id, provider=self.name, address=f"pid {pid}")
            )
        self._save()
        return result

    async def _fork(self, argv: list[str], env: dict[str, str], log_path: Path) -> int | None:
        """The pid of an agent forked by the fork server; None without a working one."""
        if self._forks is None:
            return None
        try:
            return await self._forks.spawn(argv, env, str(log_path))
        except ProviderError as exc:
            log.warning("%s: local agents start as new processes from now on", exc)
            forks, self._forks = self._forks, None
            await asyncio.to_thread(forks.close)
            return None

    async def _exec(self, argv: list[str], env: dict[str, str], log_path: Path) -> int:
        """The pid of a new ``python -m herder agent`` process (a child of this one)."""
        log_file = await asyncio.to_thread(open, log_path, "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "herder",
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        finally:
            log_file.close()
        self._children[proc.pid] = proc
        return proc.pid

    async def close(self) -> None:
        if self._forks is not None:
            forks, self._forks = self._forks, None
            await asyncio.to_thread(forks.close)

    async def terminate(self, node_id: str, grace: float) -> None:
        pid = self._pids.pop(node_id, None)
        self._save()
        if pid is None:
            return
        started = self._started.get(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not await self._wait_gone(pid, started, grace):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            await self._wait_gone(pid, started, 5.0)
        self._started.pop(pid, None)

    async def _wait_gone(self, pid: int, started: float | None, within: float) -> bool:
        child = self._children.get(pid)
        if child is not None:
            try:
                await asyncio.wait_for(child.wait(), within)
            except TimeoutError:
                return False
            self._children.pop(pid, None)
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while _alive(pid, started):
            if loop.time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def list_own(self) -> list[NodeHandle]:
        return [
            NodeHandle(node_id=n, provider=self.name, address=f"pid {pid}")
            for n, pid in self._pids.items()
            if self._running(pid)
        ]

    def _running(self, pid: int) -> bool:
        child = self._children.get(pid)
        if child is not None:
            return child.returncode is None
        return _alive(pid, self._started.get(pid))

    async def reap(self) -> list[str]:
        dead = [n for n, pid in self._pids.items() if not self._running(pid)]
        for node_id in dead:
            pid = self._pids.pop(node_id)
            self._children.pop(pid, None)
            if self._started.pop(pid, None) is None:
                continue  # never knew it well enough to kill what now holds its pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # its task workers go with it
        if dead:
            self._save()
        return dead


def _alive(pid: int, started: float | None) -> bool:
    """Whether the process that started at ``started`` with ``pid`` still runs."""
    try:
        proc = psutil.Process(pid)
        if started is not None and proc.create_time() != started:
            return False  # its pid went to another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _started_at(pid: int) -> float | None:
    """When process ``pid`` started (None: there is none): with the pid, it names
    one process, since pids get reused. A forked agent's command line is its
    fork server's, so the command line cannot tell."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
