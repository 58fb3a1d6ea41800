"""The ``local`` provider: agents as subprocesses of the coordinator's machine.

The join token reaches an agent through its environment, never its argv,
so it does not show in ``ps``. Each agent logs to ``<home>/logs/<node>.log``.

The provider writes the agents it started to ``<home>/local-agents.json``.
A coordinator restarted after a crash reads it back and adopts the agents
that still run (they reconnect by themselves), so ``--local N`` keeps N
agents, not 2N, across a kill -9 of the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import psutil

from herder.errors import ProviderError

from .base import LaunchSpec, NodeHandle, Provider, SpawnResult

# An agent whose coordinator stays away this long exits (no orphans left behind).
ORPHAN_AFTER_S = 120.0


class LocalProvider(Provider):
    """Agents as child processes; ``env`` is the environment they start from."""

    name = "local"

    def __init__(self, *, env: dict[str, str] | None = None) -> None:
        self._env = dict(os.environ) if env is None else env
        self._pids: dict[str, int] = {}
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
        for node_id, pid in recorded.items():
            if _is_our_agent(pid, node_id):
                self._pids[node_id] = pid

    def _save(self) -> None:
        tmp = self._registry.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._pids))
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
            labels = [arg for k, v in launch.labels.items() for arg in ("--label", f"{k}={v}")]
            log = await asyncio.to_thread(open, logs / f"{node_id}.log", "ab")
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "herder",
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
                    *labels,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            except OSError as exc:
                result.failed[node_id] = f"could not start {sys.executable}: {exc}"
                continue
            finally:
                log.close()
            self._pids[node_id] = proc.pid
            self._children[proc.pid] = proc
            result.started.append(
                NodeHandle(node_id=node_id, provider=self.name, address=f"pid {proc.pid}")
            )
        self._save()
        return result

    async def terminate(self, node_id: str, grace: float) -> None:
        pid = self._pids.pop(node_id, None)
        self._save()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not await self._wait_gone(pid, grace):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            await self._wait_gone(pid, 5.0)

    async def _wait_gone(self, pid: int, within: float) -> bool:
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
        while _alive(pid):
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
        return _alive(pid)

    async def reap(self) -> list[str]:
        dead = [n for n, pid in self._pids.items() if not self._running(pid)]
        for node_id in dead:
            pid = self._pids.pop(node_id)
            self._children.pop(pid, None)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # its task workers go with it
        if dead:
            self._save()
        return dead


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_our_agent(pid: int, node_id: str) -> bool:
    """Whether ``pid`` is still the agent we recorded (pids get reused)."""
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return "agent" in cmdline and node_id in cmdline
