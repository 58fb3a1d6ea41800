"""herder: raise a herd of worker nodes, keep it healthy, ship code to it and feed it tasks.

The public names are imported lazily, so a process that needs one part
(an agent's worker, say) does not pay for importing the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "DependencyFailed",
    "Future",
    "Herd",
    "HerderError",
    "LocalHerd",
    "RemoteTraceback",
    "SubmissionError",
    "TaskCancelled",
    "TaskError",
    "TaskFileError",
    "TaskFuture",
    "TaskLost",
    "TaskTimeout",
    "connect",
]

_WHERE = {
    "AsyncClient": "herder.client",
    "Client": "herder.client",
    "Future": "herder.client",
    "RemoteTraceback": "herder.client",
    "TaskFuture": "herder.client",
    "connect": "herder.client",
    "LocalHerd": "herder.local",
    "Herd": "herder.herd",
    "ConnectionLost": "herder.errors",
    "DependencyFailed": "herder.errors",
    "HerderError": "herder.errors",
    "SubmissionError": "herder.errors",
    "TaskCancelled": "herder.errors",
    "TaskError": "herder.errors",
    "TaskFileError": "herder.errors",
    "TaskLost": "herder.errors",
    "TaskTimeout": "herder.errors",
}

if TYPE_CHECKING:
    from herder.client import AsyncClient, Client, Future, RemoteTraceback, TaskFuture, connect
    from herder.errors import (
        ConnectionLost,
        DependencyFailed,
        HerderError,
        SubmissionError,
        TaskCancelled,
        TaskError,
        TaskFileError,
        TaskLost,
        TaskTimeout,
    )
    from herder.herd import Herd
    from herder.local import LocalHerd


def __getattr__(name: str) -> Any:
    if name == "providers":  # herder.providers.EC2(...) in a Herd class body
        return importlib.import_module("herder.providers")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'herder' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
