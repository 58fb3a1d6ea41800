"""A slot's worker process: runs one task at a time for its agent.

Started as ``python -m herder.agent.worker FD`` with a socket on file
descriptor FD; frames are a 4-byte big-endian length and a msgpack map.
Only what a task needs is imported here, so a worker starts fast. The
worker leads its own process group: a timeout or cancel kills the group,
taking any command the task started with it. If the agent itself dies
(kill -9), the worker kills what it runs and exits: nobody would collect the
result, and a service would otherwise run on beside its restarted copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import cloudpickle
import msgpack

from herder.values import INLINE_RESULT_BYTES, ResultRef, TaskRef, result_key


def _read_frame(stream: BinaryIO) -> dict[str, Any] | None:
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    data: dict[str, Any] = msgpack.unpackb(stream.read(size), raw=False)
    return data


def _write_frame(stream: BinaryIO, data: dict[str, Any]) -> None:
    body = msgpack.packb(data, use_bin_type=True)
    stream.write(struct.pack(">I", len(body)) + body)
    stream.flush()


def _resolve(value: Any, deps: dict[str, Any]) -> Any:
    """Swap TaskRefs (also inside lists, tuples and dicts) for dependency results."""
    if isinstance(value, TaskRef):
        if value.task_id not in deps:
            raise RuntimeError(f"the result of task {value.task_id} is not available")
        return deps[value.task_id]
    if type(value) in (list, tuple):
        return type(value)(_resolve(v, deps) for v in value)
    if type(value) is dict:
        return {k: _resolve(v, deps) for k, v in value.items()}
    return value


def _fetched(value: Any, data: Any) -> Any:
    """A dependency's result: fetched from the datastore when it was too big to travel."""
    if not isinstance(value, ResultRef):
        return value
    if data is None:
        raise RuntimeError(f"the result in {value.key} needs the datastore, which is unknown here")
    return cloudpickle.loads(data.cat(value.key))


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(exc)),
    }


def run_call(
    payload: bytes, dep_results: dict[str, bytes], data: Any = None, key: str | None = None
) -> dict[str, Any]:
    """Run a pickled call. ``data`` (a DataClient) and ``key`` say where a result too
    big to travel inline goes; dependencies' big results are fetched from it."""
    try:
        fn, args, kwargs = cloudpickle.loads(payload)
        deps = {k: _fetched(cloudpickle.loads(v), data) for k, v in dep_results.items()}
        args = _resolve(tuple(args), deps)
        kwargs = _resolve(dict(kwargs), deps)
        value = fn(*args, **kwargs)
        result = cloudpickle.dumps(value)
        if len(result) > INLINE_RESULT_BYTES and data is not None and key is not None:
            data.put(key, result)
            result = cloudpickle.dumps(ResultRef(key, len(result)))
        return {"state": "succeeded", "result": result}
    except BaseException as exc:  # a task failure is a result, whatever it raised
        try:
            pickled: bytes | None = cloudpickle.dumps(exc)
        except Exception:
            pickled = None
        return {"state": "failed", "reason": "error", "error": _error(exc), "error_pickle": pickled}


class _TaskStream(io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` of a Python call: what it prints goes to the agent.

    Text is gathered and sent as ``output`` frames, like a command's, at a
    line end once ``SEND_EVERY_S`` passed, beyond ``SEND_AT_BYTES``, and at
    the task's end: a chatty loop costs a frame a fraction of a second,
    not one per print. Only Python-level writes are seen; what C code or a
    subprocess writes to the file descriptors goes to the agent's log.
    """

    SEND_EVERY_S = 0.25
    SEND_AT_BYTES = 64 * 1024

    def __init__(self, channel: _Channel, name: str) -> None:
        self._channel = channel
        self._name = name
        self._parts: list[str] = []
        self._size = 0
        self._sent_at = time.monotonic()

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._parts.append(text)
        self._size += len(text)
        due = time.monotonic() - self._sent_at >= self.SEND_EVERY_S and "\n" in text
        if due or self._size >= self.SEND_AT_BYTES:
            self.flush()
        return len(text)

    def flush(self) -> None:
        if self._parts:
            data = "".join(self._parts).encode(errors="replace")
            self._parts, self._size = [], 0
            self._channel.write({"event": "output", "stream": self._name, "data": data})
        self._sent_at = time.monotonic()


class _AgentWatch:
    """Ends the worker, and the command it runs, once the agent is gone.

    A dead agent's end of the socket is closed by the kernel; the channel's
    reader thread sees end of file and calls :meth:`_end`, which kills the
    running command's process group, then the worker's own.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.command_group: int | None = None

    def _end(self) -> NoReturn:
        for group in (self.command_group, os.getpid()):
            if group is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
        os._exit(1)  # not reached when the worker leads its group (it is killed above)


class _Commands:
    """Runs command tasks; imported and built on the first one (call-only workers start faster).

    Keeps one datastore client per coordinator across tasks, so its
    connection is reused.
    """

    def __init__(self, channel: _Channel, watch: _AgentWatch) -> None:
        self._channel = channel  # the tailing thread writes frames too: it locks
        self._watch = watch
        self._data: Any = None
        self._data_key: tuple[str, str] | None = None

    def run(self, frame: dict[str, Any]) -> dict[str, Any]:
        from herder.agent.phases import PhaseContext, run_command_task
        from herder.model import CommandSpec

        ctx = PhaseContext(
            task_id=frame["task_id"],
            attempt=frame["attempt"],
            job_id=frame["job_id"],
            name=frame.get("name"),
            scratch_root=Path(frame["scratch_root"]),
            data=self._client(frame.get("data")),
            timeout_s=frame.get("timeout_s"),
            on_spawn=self._spawned,
            on_output=lambda stream, data: self._send(
                {"event": "output", "stream": stream, "data": data}
            ),
        )
        try:
            return run_command_task(CommandSpec.model_validate(frame["command"]), ctx)
        finally:
            self._watch.command_group = None

    def _spawned(self, pgid: int) -> None:
        self._watch.command_group = pgid
        self._send({"event": "spawned", "pgid": pgid})

    def _send(self, frame: dict[str, Any]) -> None:
        self._channel.write(frame)

    def _client(self, data: dict[str, Any] | None) -> Any:
        if data is None:
            return None
        key = (data["url"], data["bearer"])
        if self._data_key != key:
            if self._data is not None:
                self._data.close()
            self._data = _LazyData(data["url"], data["bearer"], data["ca_pem"])
            self._data_key = key
        return self._data


class _LazyData:
    """A DataClient made on first use: most calls never touch the datastore, and
    making one (httpx, a TLS context) was most of a fresh worker's first task."""

    def __init__(self, url: str, bearer: str, ca_pem: bytes) -> None:
        self._args = (url, bearer, ca_pem)
        self._client: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._client is None:
            from herder.dataclient import DataClient

            self._client = DataClient(*self._args)
        return getattr(self._client, name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


class _Channel:
    """The two sockets to the agent.

    Task frames come on ``sock`` and are read by the main thread itself,
    between tasks (no thread hand-off on the hot path); results, output and
    the task's bus frames go back on it, written under a lock (the tailing
    thread writes too). Bus deliveries (``{"deliver": topic, ...}``) come on
    ``bus``, read by a thread of their own so a running task's
    ``herder.node`` handlers get messages while it runs. When the agent is
    gone the kernel closes both: that thread sees end of file and, if a task
    is running, kills its command group and the worker
    (:class:`_AgentWatch`); an idle main thread sees it on ``sock``.
    """

    def __init__(self, sock: socket.socket, bus: socket.socket, watch: _AgentWatch) -> None:
        self.rfile = sock.makefile("rb")
        self.wfile = sock.makefile("wb")
        self._bus = bus.makefile("rb")
        self._watch = watch
        self.lock = threading.Lock()
        self.busy = False
        threading.Thread(target=self._read_bus, name="herder-worker-bus", daemon=True).start()

    def write(self, frame: dict[str, Any]) -> None:
        with self.lock:
            _write_frame(self.wfile, frame)

    def _read_bus(self) -> None:
        from herder import node

        while True:
            try:
                frame = _read_frame(self._bus)
            except (OSError, ValueError):
                frame = None  # a broken socket: the agent is gone all the same
            if frame is None:
                if self.busy:
                    self._watch._end()
                return
            node._deliver(node.Message(frame["deliver"], frame.get("data"), frame["sender"]))


def _captured(channel: _Channel, commands: _Commands, frame: dict[str, Any]) -> dict[str, Any]:
    """Run a Python call with what it prints sent to the agent as its output."""
    out_stream, err_stream = _TaskStream(channel, "stdout"), _TaskStream(channel, "stderr")
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out_stream, err_stream
    try:
        key = result_key(frame["task_id"], frame["attempt"]) if "task_id" in frame else None
        data = commands._client(frame["data"]) if "data" in frame else commands._data
        return run_call(frame["payload"], frame.get("dep_results") or {}, data, key)
    finally:
        sys.stdout, sys.stderr = saved
        out_stream.flush()
        err_stream.flush()


def main(fd: int, bus_fd: int) -> None:
    from herder import node, task

    sock = socket.socket(fileno=fd)
    watch = _AgentWatch(sock)
    channel = _Channel(sock, socket.socket(fileno=bus_fd), watch)
    commands = _Commands(channel, watch)
    task._bind(channel.write)
    while True:
        try:
            frame = _read_frame(channel.rfile)
        except (OSError, ValueError):
            return  # a broken socket: the agent is gone
        if frame is None:
            return
        started = time.time()
        channel.busy = True
        task._running.set()
        try:
            out = (
                _captured(channel, commands, frame)
                if frame["kind"] == "call"
                else commands.run(frame)
            )
        finally:
            task._running.clear()
            node._clear()
            channel.busy = False
        out["started_at"] = started
        out["ended_at"] = time.time()
        channel.write(out)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
