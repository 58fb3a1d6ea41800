"""The ``local`` provider: agents as subprocesses of the coordinator's machine.

The join token reaches the agent through its environment, never its argv,
so it does not show in ``ps``. Each agent logs to ``<home>/logs/<node>.log``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import sys
from pathlib import Path

from .base import NodeHandle, Provider


class LocalProvider(Provider):
    name = "local"

    def __init__(self, *, join: str, slots: int, home: Path, env: dict[str, str]) -> None:
        self._join = join
        self._slots = slots
        self._home = home
        self._env = env
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._prefix = f"local-{secrets.token_hex(3)}"
        self._counter = itertools.count(1)

    async def spawn(self, count: int) -> list[NodeHandle]:
        logs = self._home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        handles = []
        for _ in range(count):
            node_id = f"{self._prefix}-{next(self._counter)}"
            env = {**self._env, "HERDER_JOIN": self._join}
            with open(logs / f"{node_id}.log", "ab") as log:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "herder",
                    "agent",
                    "--node-id",
                    node_id,
                    "--slots",
                    str(self._slots),
                    "--provider",
                    self.name,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            self._procs[node_id] = proc
            handles.append(NodeHandle(node_id=node_id, provider=self.name, address=str(proc.pid)))
        return handles

    async def terminate(self, node_id: str, grace: float) -> None:
        proc = self._procs.pop(node_id, None)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()

    async def list_own(self) -> list[NodeHandle]:
        return [
            NodeHandle(node_id=n, provider=self.name, address=str(p.pid))
            for n, p in self._procs.items()
            if p.returncode is None
        ]

    async def reap(self) -> list[str]:
        dead = [n for n, p in self._procs.items() if p.returncode is not None]
        for node_id in dead:
            proc = self._procs.pop(node_id)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its task workers go with it
        return dead
