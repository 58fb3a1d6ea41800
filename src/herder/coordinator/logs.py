"""Tasks' stdout and stderr: live while they run, kept in the datastore after.

Agents stream what a task writes as it writes it (commands every half
second, Python calls as they print). The coordinator keeps each running
attempt's streams in memory, bounded: the last ``LIMIT`` bytes of each, with
the count of bytes dropped before them, so a reader following with an
offset sees exactly what was lost. When the attempt ends (its result, a
retry, a lost node, a cancel) the buffers are written to the datastore as
``logs/<task>/<attempt>/<stream>``: they outlive the node and the
coordinator's memory. Memory is bounded by running tasks × 2 × ``LIMIT``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from herder.datastore import Datastore
from herder.errors import DatastoreError, ObjectMissing

log = logging.getLogger("herder.coordinator")

LIMIT = 1024 * 1024  # bytes kept per stream of a running attempt
STREAMS = ("stdout", "stderr")
# How many finished attempts stay readable from memory while their write is
# under way (a reader asking right after the end must not miss them).
_RECENT = 4096


def log_key(task_id: str, attempt: int, stream: str) -> str:
    return f"logs/{task_id}/{attempt}/{stream}"


@dataclass
class _Stream:
    kept: bytearray = field(default_factory=bytearray)
    dropped: int = 0  # bytes written before ``kept`` that are no longer held

    def add(self, data: bytes) -> None:
        self.kept += data
        if len(self.kept) > LIMIT:
            cut = len(self.kept) - LIMIT
            del self.kept[:cut]
            self.dropped += cut

    def since(self, offset: int) -> tuple[bytes, int]:
        """Bytes from absolute ``offset`` on (or from the oldest kept), and the next offset."""
        end = self.dropped + len(self.kept)
        start = max(offset, self.dropped)
        return bytes(self.kept[start - self.dropped :]), end

    def stored(self) -> bytes:
        head = f"[herder: {self.dropped} earlier bytes dropped]\n".encode() if self.dropped else b""
        return head + bytes(self.kept)


@dataclass
class _Attempt:
    lease_id: str
    attempt: int
    streams: dict[str, _Stream] = field(default_factory=dict)  # made on the first output


@dataclass
class LogView:
    """What ``GET /v1/tasks/{id}/logs`` answers."""

    data: str
    offset: int
    attempt: int | None
    live: bool  # the attempt still runs: more may come


class TaskLogs:
    def __init__(self, datastore: Datastore) -> None:
        self._datastore = datastore
        self._running: dict[str, _Attempt] = {}
        self._recent: dict[str, _Attempt] = {}  # ended, being written (or just written)
        self._writes: set[asyncio.Future[None]] = set()

    def begin(self, task_id: str, lease_id: str, attempt: int) -> None:
        """An attempt was leased: its output starts now (an earlier one's is kept)."""
        old = self._running.get(task_id)
        if old is not None and old.lease_id != lease_id:
            self._keep(task_id, old)
        self._running[task_id] = _Attempt(lease_id, attempt)

    def add(self, task_id: str, lease_id: str, stream: str, data: bytes) -> None:
        current = self._running.get(task_id)
        if current is not None and current.lease_id == lease_id and stream in STREAMS:
            current.streams.setdefault(stream, _Stream()).add(data)

    def tails(self, task_id: str) -> dict[str, str] | None:
        """The running attempt's recent output of each stream (for ``herder task``)."""
        current = self._running.get(task_id)
        if current is None or not any(s.kept for s in current.streams.values()):
            return None
        return {
            name: bytes(s.kept[-16384:]).decode(errors="replace")
            for name, s in current.streams.items()
            if s.kept
        }

    def end(self, task_ids: Iterable[str]) -> None:
        """These tasks' attempts ended: write their output to the datastore."""
        for task_id in task_ids:
            current = self._running.pop(task_id, None)
            if current is not None:
                self._keep(task_id, current)

    def _keep(self, task_id: str, attempt: _Attempt) -> None:
        if not any(s.kept or s.dropped for s in attempt.streams.values()):
            return  # nothing written: nothing to keep (most no-op tasks)
        self._recent[task_id] = attempt
        while len(self._recent) > _RECENT:
            self._recent.pop(next(iter(self._recent)))
        write = asyncio.ensure_future(asyncio.to_thread(self._write, task_id, attempt))
        self._writes.add(write)
        write.add_done_callback(self._written)

    def _write(self, task_id: str, attempt: _Attempt) -> None:
        for name, stream in attempt.streams.items():
            if stream.kept or stream.dropped:
                self._datastore.put_stream(
                    log_key(task_id, attempt.attempt, name), [stream.stored()]
                )

    def _written(self, write: asyncio.Future[None]) -> None:
        self._writes.discard(write)
        if not write.cancelled() and write.exception() is not None:
            log.error("could not keep a task's logs in the datastore: %s", write.exception())

    async def flush(self) -> None:
        """Wait for the writes under way (at shutdown: no output is lost)."""
        if self._writes:
            await asyncio.wait(set(self._writes))

    async def read(
        self, task_id: str, stream: str, offset: int, attempt: int | None
    ) -> LogView | None:
        """The stream from ``offset``: live from memory while it runs, else from the
        datastore (``attempt`` None: the latest). None when nothing was written."""
        current = self._running.get(task_id)
        if current is not None and attempt in (None, current.attempt):
            data, end = current.streams.get(stream, _Stream()).since(offset)
            return LogView(data.decode(errors="replace"), end, current.attempt, live=True)
        recent = self._recent.get(task_id)
        if recent is not None and attempt in (None, recent.attempt):
            data = recent.streams.get(stream, _Stream()).stored()
            return LogView(data[offset:].decode(errors="replace"), len(data), recent.attempt, False)
        return await asyncio.to_thread(self._stored, task_id, stream, offset, attempt)

    def _stored(
        self, task_id: str, stream: str, offset: int, attempt: int | None
    ) -> LogView | None:
        if attempt is None:
            found = [
                int(info.key.split("/")[2])
                for info in self._datastore.ls(f"logs/{task_id}/")
                if info.key.endswith("/" + stream) and info.key.split("/")[2].isdigit()
            ]
            if not found:
                return None
            attempt = max(found)
        try:
            _, chunks = self._datastore.open_read(log_key(task_id, attempt, stream))
            data = b"".join(chunks)
        except ObjectMissing:
            return None
        except DatastoreError as exc:
            raise DatastoreError(f"logs of task {task_id}: {exc}", task_id=task_id) from exc
        return LogView(data[offset:].decode(errors="replace"), len(data), attempt, live=False)
