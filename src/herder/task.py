"""``herder.task``: what code running as a herder task can tell the herd.

``progress(0.4, "aligning")`` shows in ``herder task ID``, ``herder wait``
and the client's ``future.progress``; ``emit(topic, data)`` reaches the
clients' listeners; ``send(node_or_selector, topic, data)`` reaches the
``herder.node.on`` handlers on other nodes, relayed by the coordinator;
``telemetry({"loss": 0.3})`` adds the task's own readings to the node's
time series (``GET /v1/telemetry?node=N&task=T``).

Each call writes one frame to the task's agent over the worker's socket,
the way a command's output travels; the agent batches them into its next
frame to the coordinator. Calls never block on the network. Outside a task
(no worker) they raise :class:`RuntimeError`, so a mistake is not silent.
``data`` is JSON-like and at most 64 KB once packed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from herder.values import check_bus_data

__all__ = ["emit", "in_task", "progress", "send", "telemetry"]

MAX_READINGS = 64  # keys per telemetry call


_write: Callable[[dict[str, Any]], None] | None = None
_running = threading.Event()


def in_task() -> bool:
    """Whether this code runs inside a herder task now."""
    return _write is not None and _running.is_set()


def progress(fraction: float, message: str = "") -> None:
    """Report how far the task is: ``fraction`` from 0 to 1, and a short note."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"progress is a fraction from 0 to 1, not {fraction}")
    _frame({"event": "progress", "fraction": float(fraction), "message": message[:500]})


def emit(topic: str, data: Any = None) -> None:
    """Send an event to the clients listening (``herd.on("emit", fn)``)."""
    _frame({"event": "emit", "topic": _topic(topic), "data": check_bus_data(data)})


def send(target: str, topic: str, data: Any = None) -> None:
    """Send to the ``herder.node.on(topic, ...)`` handlers of ``target``:
    a node id, ``"all"`` or a selector."""
    if not target:
        raise ValueError("a target is a node id, 'all' or a selector")
    _frame(
        {"event": "send", "target": target, "topic": _topic(topic), "data": check_bus_data(data)}
    )


def telemetry(readings: dict[str, float]) -> None:
    """Record the task's own numbers (``{"loss": 0.3, "step": 1200}``) with the node's.

    Names are 1 to 64 characters; values are numbers. Readings within one
    second are merged (the last value of a name wins).
    """
    if not isinstance(readings, dict) or not 0 < len(readings) <= MAX_READINGS:
        raise ValueError(f"telemetry takes a dict of 1 to {MAX_READINGS} name: number readings")
    clean: dict[str, float] = {}
    for name, value in readings.items():
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise ValueError(f"telemetry: a reading's name is 1 to 64 characters, not {name!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"telemetry: {name} must be a number, not {type(value).__name__}")
        clean[name] = float(value)
    _frame({"event": "telemetry", "readings": clean})


def _topic(topic: str) -> str:
    if not topic or len(topic) > 256:
        raise ValueError("a topic is 1 to 256 characters")
    return topic


def _frame(frame: dict[str, Any]) -> None:
    write = _write
    if write is None or not _running.is_set():
        raise RuntimeError("herder.task is only usable inside a running herder task")
    write(frame)


def _bind(write: Callable[[dict[str, Any]], None]) -> None:
    """Called by the worker: where frames go (thread-safe writer to the agent)."""
    global _write
    _write = write
