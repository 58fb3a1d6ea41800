"""``herder.node``: handlers for bus messages, in code that runs on a node.

``herder.node.on("ping", handler)`` inside a running task registers
``handler`` in that task's worker process. Python tasks run in worker
subprocesses, so that is where handlers live: the agent forwards each
``Deliver`` it gets to the workers of its running tasks over the same
socket it gives them tasks on, and the worker calls the handlers of the
topic on one dispatch thread, in arrival order. Handlers are dropped when
the task that registered them ends (the worker is reused for the next task,
which must not inherit them); a task that serves messages therefore stays
running (waiting on a ``threading.Event`` its handlers set, say).

A handler gets a :class:`Message`; to answer, it calls
``herder.task.send(message.sender, topic, data)``. An exception in a handler
is the task code's fault: its traceback is printed to the task's stderr and
the next message is handled.
"""

from __future__ import annotations

import queue
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Message", "off", "on"]


@dataclass(frozen=True)
class Message:
    """One bus message: its topic, its data, and who sent it (a node id or ``"client"``)."""

    topic: str
    data: Any
    sender: str


Handler = Callable[[Message], object]

_lock = threading.Lock()
_handlers: dict[str, list[Handler]] = {}
_inbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
_dispatcher: threading.Thread | None = None


def on(topic: str, handler: Handler) -> None:
    """Call ``handler(message)`` for each message on ``topic`` sent to this node."""
    if not topic:
        raise ValueError("a topic is a non-empty string")
    with _lock:
        _handlers.setdefault(topic, []).append(handler)


def off(topic: str, handler: Handler | None = None) -> None:
    """Stop calling ``handler`` (every handler of ``topic`` when None)."""
    with _lock:
        if handler is None:
            _handlers.pop(topic, None)
        elif handler in _handlers.get(topic, []):
            _handlers[topic].remove(handler)


def _deliver(message: Message) -> None:
    """Queue ``message`` for the dispatch thread (called by the worker's reader)."""
    global _dispatcher
    with _lock:
        if _dispatcher is None:
            _dispatcher = threading.Thread(target=_dispatch, name="herder-bus", daemon=True)
            _dispatcher.start()
    _inbox.put(message)


def _clear() -> None:
    """Forget every handler: the task that registered them has ended."""
    with _lock:
        _handlers.clear()


def _dispatch() -> None:
    while (message := _inbox.get()) is not None:
        with _lock:
            handlers = list(_handlers.get(message.topic, ()))
        for handler in handlers:
            try:
                handler(message)
            except Exception:  # the task's own bug: shown in its stderr, the bus goes on
                traceback.print_exc(file=sys.stderr)
