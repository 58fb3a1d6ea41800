"""Slots: each one a long-lived worker process that runs one task at a time.

Keeping the worker alive between tasks makes a no-op task cost a socket
round trip, not a process start. A timeout, a cancel or a crash kills the
worker's whole process group and starts a fresh worker for the next task.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import sys
import time
from typing import Any

import msgpack

from herder import protocol


class Slot:
    """One worker process and the socket to it."""

    def __init__(self, index: int, env: dict[str, str] | None = None) -> None:
        self.index = index
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _ensure(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        ours, theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "herder.agent.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                env=self._env,
            )
        finally:
            theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)

    async def run(self, task: protocol.Assignment) -> dict[str, Any]:
        """Run ``task``; returns the worker's outcome map (never raises for task faults)."""
        await self._ensure()
        assert self._reader is not None
        assert self._writer is not None
        frame = {
            "kind": task.kind,
            "payload": task.payload,
            "command": task.command.model_dump() if task.command else None,
            "dep_results": task.dep_results,
        }
        body = msgpack.packb(frame, use_bin_type=True)
        started = time.time()
        self._writer.write(struct.pack(">I", len(body)) + body)
        try:
            async with asyncio.timeout(task.timeout_s):
                await self._writer.drain()
                header = await self._reader.readexactly(4)
                (size,) = struct.unpack(">I", header)
                out: dict[str, Any] = msgpack.unpackb(
                    await self._reader.readexactly(size), raw=False
                )
                return out
        except asyncio.CancelledError:
            await self.kill()  # a cancelled task must not keep running
            raise
        except TimeoutError:
            await self.kill()
            return {
                "state": "failed",
                "reason": "timeout",
                "error": {
                    "type": "TaskTimeout",
                    "message": f"task ran past its timeout of {task.timeout_s}s",
                },
                "started_at": started,
                "ended_at": time.time(),
            }
        except (asyncio.IncompleteReadError, ConnectionError):
            code = await self._reap()
            return {
                "state": "failed",
                "reason": "worker died",
                "error": {
                    "type": "WorkerDied",
                    "message": f"the worker process died ({_describe_exit(code)})",
                },
                "started_at": started,
                "ended_at": time.time(),
            }

    async def kill(self) -> None:
        """Kill the worker and everything it started (its process group)."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return await proc.wait()

    async def close(self) -> None:
        await self.kill()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
