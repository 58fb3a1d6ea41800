"""The Celery app of ``bench/compare.py``: the shared tasks, Redis as broker and backend.

Imported by the Celery workers (``celery -A compare_celery worker``) and by
``compare_peers.py``; the Redis URL comes from ``BENCH_REDIS_URL``.
"""

from __future__ import annotations

import os

import compare_common
from celery import Celery

app = Celery("compare", broker=os.environ["BENCH_REDIS_URL"], backend=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
noop = app.task(name="noop")(compare_common.noop)
inc = app.task(name="inc")(compare_common.inc)


@app.task(name="sum_list")
def sum_list(values: list[int]) -> int:
    """A chord's callback gets its header's results as one list."""
    return sum(values)
