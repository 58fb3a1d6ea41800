"""Values that travel inside tasks' payloads and results, and on the bus.

The client pickles a :class:`TaskRef` where a user passed a future, the
worker swaps in the dependency's result, and returns a :class:`ResultRef`
for a result too big to travel inline. They live here, apart from
:mod:`herder.model`, because the worker process needs them and nothing
else of the model: importing pydantic made a worker's start (its first
task's wait, and each restart after a timeout, cancel or crash) about
0.17 s longer. Standard library and msgpack only.

``herder.model`` re-exports these names, so payloads pickled before they
moved (``herder.model.TaskRef``) still load: to the same classes.
"""

from __future__ import annotations

from typing import Any

import msgpack

MAX_BUS_DATA_BYTES = 64 * 1024


def check_bus_data(data: Any) -> Any:
    """``data`` as sent on the event bus: JSON-like and at most 64 KB once packed.

    Checked where the data is made (client, task) for a clear error at the
    call, and again in the protocol, so no peer can push big blobs through
    the bus: large things belong in the datastore.
    """
    try:
        size = len(msgpack.packb(data, use_bin_type=True))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"data must be JSON-like (msgpack): {exc}") from exc
    if size > MAX_BUS_DATA_BYTES:
        raise ValueError(
            f"data is {size} bytes packed; the bus carries at most {MAX_BUS_DATA_BYTES} "
            "(put large values in the datastore and send their key)"
        )
    return data


class TaskRef:
    """Stands in a pickled argument for the result of another task.

    The client puts one where a user passed a future; the node swaps in the
    dependency's result before the call. It lives here, an importable module,
    so cloudpickle pickles it by reference (as ``herder.values.TaskRef``).
    """

    __slots__ = ("task_id",)

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id

    def __repr__(self) -> str:
        return f"TaskRef({self.task_id!r})"

    def __reduce__(self) -> tuple[type[TaskRef], tuple[str]]:
        return (TaskRef, (self.task_id,))


# A call's pickled result larger than this is put in the datastore by the node,
# and only a ResultRef to it travels and is stored.
INLINE_RESULT_BYTES = 1024 * 1024


class ResultRef:
    """Stands for a result too big to travel inline: where the node put its pickle.

    The worker stores the pickled value under ``key`` and returns this, pickled,
    as the task's result; the coordinator keeps and forwards those few bytes
    without looking, and the client, or a dependent task's worker, fetches and
    unpickles the value.
    """

    __slots__ = ("key", "size")

    def __init__(self, key: str, size: int) -> None:
        self.key = key
        self.size = size

    def __repr__(self) -> str:
        return f"ResultRef({self.key!r}, {self.size})"

    def __reduce__(self) -> tuple[type[ResultRef], tuple[str, int]]:
        return (ResultRef, (self.key, self.size))


def result_key(task_id: str, attempt: int) -> str:
    return f"results/{task_id}/{attempt}"
