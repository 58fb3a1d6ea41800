"""An execution log kept outside the store: one JSON line per attempt started and ended.

The fault suite's checker compares it with what the store recorded: the
store alone cannot show an execution it never heard of (a task run twice
because a lease was handed out twice, or run after its lease was gone).
Lines are appended with ``O_APPEND`` in one ``write`` each, so several
agents can share one file and a line is never interleaved with another.
Not fsynced: a line lost with a killed machine is a lost observation, not
lost work.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


class ExecLog:
    """Appends ``{"event": "start"|"end", "task", "attempt", "lease", "node", "pid", "at"}``."""

    def __init__(self, path: Path, node_id: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._node_id = node_id

    def write(self, event: str, task_id: str, attempt: int, lease_id: str, **extra: Any) -> None:
        """Append one line; ``extra`` holds what the end of an attempt adds (its state)."""
        line = {
            "event": event,
            "task": task_id,
            "attempt": attempt,
            "lease": lease_id,
            "node": self._node_id,
            "pid": os.getpid(),
            "at": time.time(),
            **extra,
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())
