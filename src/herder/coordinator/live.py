"""The last output of each running command, kept in memory for ``herder task``.

Agents stream what their commands write while they run; the coordinator
keeps only the most recent bytes of each stream (the full tails arrive with
the result and are stored then). Memory is bounded by running tasks x 2 x
``LIMIT``.
"""

from __future__ import annotations

from collections.abc import Iterable

LIMIT = 16 * 1024


class LiveOutput:
    def __init__(self) -> None:
        self._tails: dict[str, dict[str, bytearray]] = {}

    def add(self, task_id: str, stream: str, data: bytes) -> None:
        tail = self._tails.setdefault(task_id, {}).setdefault(stream, bytearray())
        tail += data
        if len(tail) > LIMIT:
            del tail[: len(tail) - LIMIT]

    def get(self, task_id: str) -> dict[str, str] | None:
        streams = self._tails.get(task_id)
        if streams is None:
            return None
        return {name: bytes(tail).decode(errors="replace") for name, tail in streams.items()}

    def drop(self, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            self._tails.pop(task_id, None)
