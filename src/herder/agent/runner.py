"""Slots: each one a long-lived worker process that runs one task at a time.

Keeping the worker alive between tasks makes a no-op task cost a socket
round trip, not a process start. A timeout, a cancel or a crash kills the
worker's whole process group and starts a fresh worker for the next task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from herder import protocol
from herder.agent.phases import attempt_dir
from herder.releases.cache import Hold, Installed

log = logging.getLogger(__name__)

# Variables that carry the cluster secret: never passed on to a worker, so no
# task (nor any program a task runs) can read the join token from its environment.
SECRET_VARIABLES = frozenset({"HERDER_JOIN", "HERDER_TOKEN"})


def task_environment() -> dict[str, str]:
    """The agent's environment less the secret, for its workers."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}


def release_environment(base: dict[str, str], env: Installed) -> dict[str, str]:
    """``base`` as a task in release ``env`` sees it: the release's ``bin`` first on
    the PATH (so ``python`` is the release's), as an activated virtualenv would."""
    bin_dir = str(env.python.parent)
    return {
        **base,
        "VIRTUAL_ENV": str(env.python.parent.parent),
        "PATH": bin_dir + os.pathsep + base.get("PATH", os.defpath),
        "HERDER_RELEASE": env.release_id,
        "HERDER_RELEASE_DIR": str(env.source),
    }


class Slot:
    """One worker process and the socket to it.

    ``context`` is what every command task is given besides its own spec:
    ``scratch_root`` and ``data`` (how to reach the datastore); the agent
    fills in ``data`` once paired.
    """

    def __init__(
        self,
        index: int,
        context: dict[str, Any],
        on_output: Callable[[protocol.Assignment, str, bytes], None] | None = None,
        env: dict[str, str] | None = None,
        on_bus: Callable[[protocol.Assignment, dict[str, Any]], None] | None = None,
    ) -> None:
        self.index = index
        self.context = context
        self._on_output = on_output
        self._on_bus = on_bus  # a task's herder.task progress / emit / send frames
        self.running: protocol.Assignment | None = None  # the task it runs now
        self._env = env
        self._command_groups: set[int] = set()  # process groups of commands now running
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._bus_writer: asyncio.StreamWriter | None = None
        # the release its worker runs in (None: the agent's own environment), held in use
        self._release: Installed | None = None
        self._hold: Hold | None = None
        self._data_sent: Any = None  # the datastore context this worker was last given

    @property
    def release_id(self) -> str | None:
        return self._release.release_id if self._release is not None else None

    async def switch(self, release: Installed | None, hold: Hold | None) -> None:
        """Run the next tasks in ``release``: the worker is replaced, the old release
        let go (it may be evicted once no slot holds it)."""
        await self.kill()
        if self._hold is not None:
            self._hold.release()
        self._release, self._hold = release, hold

    async def warm(self) -> None:
        """Start the worker now, not at the first task: that task then skips the
        worker's start (a new interpreter and its imports, about 0.1 s), as a
        prefork pool's first task does. A worker that cannot start here is
        started (and its failure reported) by the first task instead."""
        try:
            await self._ensure()
        except OSError as exc:
            log.warning("slot %d: worker not started ahead of a task: %s", self.index, exc)

    async def _ensure(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        base = self._env if self._env is not None else task_environment()
        python = sys.executable
        if self._release is not None:
            python = str(self._release.python)
            base = release_environment(base, self._release)
        # Tasks and results on one socket, bus deliveries on another: the
        # worker's main thread reads tasks itself, a thread of its own the bus.
        ours, theirs = socket.socketpair()
        bus_ours, bus_theirs = socket.socketpair()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                python,
                "-m",
                "herder.agent.worker",
                str(theirs.fileno()),
                str(bus_theirs.fileno()),
                pass_fds=(theirs.fileno(), bus_theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                env=base,
            )
        finally:
            theirs.close()
            bus_theirs.close()
        self._reader, self._writer = await asyncio.open_unix_connection(sock=ours)
        _, self._bus_writer = await asyncio.open_unix_connection(sock=bus_ours)

    async def run(self, task: protocol.Assignment) -> dict[str, Any]:
        """Run ``task``; returns the worker's outcome map (never raises for task faults)."""
        await self._ensure()
        assert self._reader is not None
        assert self._writer is not None
        frame: dict[str, Any] = {
            "kind": task.kind,
            "payload": task.payload,
            "dep_results": task.dep_results,
        }
        if task.command is None:
            # where a big result goes: the datastore's address only when it changed
            frame.update(task_id=task.task_id, attempt=task.attempt)
            if self.context.get("data") is not self._data_sent:
                frame["data"] = self._data_sent = self.context.get("data")
        else:
            frame.update(
                self.context,
                command=task.command.model_dump(),
                task_id=task.task_id,
                attempt=task.attempt,
                job_id=task.job_id,
                name=task.name,
                timeout_s=task.timeout_s,
            )
        body = msgpack.packb(frame, use_bin_type=True)
        started = time.time()
        self._writer.write(struct.pack(">I", len(body)) + body)
        # A command's worker enforces the timeout on the run phase itself, so
        # that upload and cleanup still happen; a call is stopped from here.
        limit = task.timeout_s if task.command is None else None
        self.running = task
        try:
            async with asyncio.timeout(limit):
                await self._writer.drain()
                return await self._outcome(task)
        except asyncio.CancelledError:
            await self.kill()  # a cancelled task must not keep running
            self._clean_scratch(task)
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
            self._clean_scratch(task)
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
        finally:
            self.running = None

    def deliver(self, message: protocol.Deliver) -> bool:
        """Pass a bus message to the running task's worker (its ``herder.node`` handlers).

        False when no task runs here: handlers live only as long as their task.
        """
        if self.running is None or self._bus_writer is None:
            return False
        frame = {"deliver": message.topic, "data": message.data, "sender": message.sender}
        body = msgpack.packb(frame, use_bin_type=True)
        self._bus_writer.write(struct.pack(">I", len(body)) + body)
        return True

    async def _outcome(self, task: protocol.Assignment) -> dict[str, Any]:
        """Read frames until the task's outcome, noting the commands it starts
        and passing on their output as it comes."""
        assert self._reader is not None
        while True:
            header = await self._reader.readexactly(4)
            (size,) = struct.unpack(">I", header)
            out: dict[str, Any] = msgpack.unpackb(await self._reader.readexactly(size), raw=False)
            if out.get("event") == "spawned":
                self._command_groups.add(out["pgid"])
                continue
            if out.get("event") == "output":
                if self._on_output is not None:
                    self._on_output(task, out["stream"], out["data"])
                continue
            if out.get("event") in ("progress", "emit", "send", "telemetry"):
                if self._on_bus is not None:
                    self._on_bus(task, out)
                continue
            self._command_groups.clear()
            return out

    def _clean_scratch(self, task: protocol.Assignment) -> None:
        """After a kill the worker could not clean up: remove the attempt's scratch here."""
        if task.command is not None and not task.command.keep_scratch:
            root = self.context.get("scratch_root")
            if root:
                shutil.rmtree(attempt_dir(Path(root), task.task_id, task.attempt), True)

    async def kill(self) -> None:
        """Kill the worker and everything it started (its process group and its commands')."""
        groups = set(self._command_groups)
        self._command_groups.clear()
        if self._proc is not None and self._proc.returncode is None:
            groups.add(self._proc.pid)
        for pgid in groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        await self._reap()

    async def _reap(self) -> int | None:
        proc, self._proc = self._proc, None
        self._data_sent = None  # a new worker is told again
        if self._writer is not None:
            self._writer.close()
            self._writer = self._reader = None
        if self._bus_writer is not None:
            self._bus_writer.close()
            self._bus_writer = None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return await proc.wait()

    async def close(self) -> None:
        await self.switch(None, None)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown exit"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
