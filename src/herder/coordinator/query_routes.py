"""Read-only views of the herd: executors, tasks, jobs, telemetry, timelines, logs, metrics.

The same set is in the Python client and the CLI. Task listings page by
keyset (``after`` the last id of a page, in submission order or newest
first) so every page costs the same at a million tasks; no route counts a
filtered set.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from herder.model import FINAL_TASK_STATES, ID_PATTERN, JobSummary, TaskRecord, TaskState

from .metrics import CONTENT_TYPE, Metrics

if TYPE_CHECKING:
    from .service import Coordinator

# ``states=`` groups: what a user means by pending, running, finished.
STATE_GROUPS: dict[str, list[TaskState]] = {
    "pending": [TaskState.WAITING, TaskState.READY],
    "running": [TaskState.LEASED, TaskState.RUNNING],
    "finished": sorted(FINAL_TASK_STATES, key=lambda s: s.value),
}


def query_router(coord: Coordinator) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/executors")
    async def executors() -> list[dict[str, Any]]:
        """Nodes alive, with slots used and free, what each runs now and its last reading."""
        running = await coord.store.tasks(states=STATE_GROUPS["running"], limit=10_000)
        by_node: dict[str, list[dict[str, Any]]] = {}
        for t in running:
            if t.node_id is not None:
                by_node.setdefault(t.node_id, []).append(
                    {"task_id": t.id, "name": t.name, "job_id": t.job_id,
                     "state": t.state.value, "started_at": t.started_at}
                )  # fmt: skip
        out = []
        for node in await coord.store.nodes(alive_only=True):
            tasks = by_node.get(node.id, [])
            used = min(node.slots, sum(1 for t in tasks if t["state"] == "running"))
            reading = coord.telemetry.latest.get(node.id)
            out.append(
                {
                    **node.model_dump(mode="json"),
                    "used": used,
                    "free": max(0, node.slots - used),
                    "running": tasks,
                    "telemetry": reading[1] if reading else None,
                    "telemetry_at": reading[0] if reading else None,
                    "available": node.id not in coord.bus.paused,
                }
            )
        return out

    @router.get("/v1/usage")
    async def usage(window_s: Annotated[float, Query(gt=0, le=86_400)] = 60.0) -> dict[str, Any]:
        """Resource use per node and in total: now, and averaged / peak over the window."""
        return await coord.telemetry.usage(window_s)

    @router.get("/v1/telemetry")
    async def telemetry(
        node: str,
        window_s: Annotated[float, Query(gt=0, le=86_400)] = 600.0,
        task: str = "",
    ) -> dict[str, Any]:
        """One node's series (or, with ``task``, a task's own readings on it)."""
        resolution, points = await coord.telemetry.series(node, window_s, task_id=task)
        return {"node": node, "task": task or None, "resolution_s": resolution, "points": points}

    @router.get("/v1/tasks")
    async def list_tasks(
        state: TaskState | None = None,
        states: Literal["pending", "running", "finished"] | None = None,
        job: str | None = None,
        node: str | None = None,
        name: Annotated[str | None, Query(max_length=256)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        after: str | None = None,
        order: Literal["asc", "desc"] = "asc",
    ) -> list[dict[str, Any]]:
        wanted = [state] if state is not None else STATE_GROUPS[states] if states else None
        rows = await coord.store.tasks(
            states=wanted,
            job_id=job,
            node_id=node,
            name=name,
            limit=limit,
            after=after,
            descending=order == "desc",
        )
        return [task_json(coord, r) for r in rows]

    @router.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        job = await coord.store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return {**job_json(job), "progress": coord.bus.job_progress(job_id)}

    @router.get("/v1/timeline")
    async def timeline(
        job: str | None = None,
        since: float | None = None,
        limit: Annotated[int, Query(ge=1, le=100_000)] = 5000,
    ) -> list[dict[str, Any]]:
        """Attempts as (node, start, end, outcome), oldest first: a task stream."""
        return await coord.store.timeline(job_id=job, since=since, limit=limit)

    @router.get("/v1/tasks/{task_id}/logs")
    async def logs(
        task_id: str,
        stream: Literal["stdout", "stderr"] = "stdout",
        offset: Annotated[int, Query(ge=0)] = 0,
        attempt: Annotated[int | None, Query(ge=1)] = None,
    ) -> dict[str, Any]:
        """A task's output from ``offset``: live while it runs, from the datastore after.

        ``done`` says no more will come (the task finished, or its attempt
        ended and nothing runs it now): a follower stops there.
        """
        if not re.match(ID_PATTERN, task_id):  # no task has it, nor a datastore key for logs
            raise HTTPException(404, f"no task {task_id}")
        view = await coord.logs.read(task_id, stream, offset, attempt)
        record = await coord.store.task(task_id)
        if record is None and view is None:
            raise HTTPException(404, f"no task {task_id}")
        finished = record is None or record.state in FINAL_TASK_STATES
        if view is None:
            return {"data": "", "offset": offset, "attempt": None, "done": finished}
        return {
            "data": view.data,
            "offset": view.offset,
            "attempt": view.attempt,
            "done": finished and not view.live,
        }

    @router.get("/metrics")
    async def metrics() -> Response:
        body = await coord.metrics.render(lambda m: _refresh(coord, m))
        return Response(body, media_type=CONTENT_TYPE)

    return router


async def _refresh(coord: Coordinator, metrics: Metrics) -> None:
    """Set the gauges that come from the store and the sessions."""
    metrics.set_tasks(await coord.counts(), [s.value for s in TaskState])
    nodes: dict[tuple[str, str], int] = {}
    for n in await coord.store.nodes(alive_only=True):
        key = (n.state.value, n.provider)
        nodes[key] = nodes.get(key, 0) + 1
    metrics.set_nodes(nodes)
    now = time.monotonic()
    metrics.agents.set(len(coord.agents))
    metrics.watched.set(len(coord.watchers))
    metrics.set_heartbeat_lag({a.node_id: now - a.last_heard for a in coord.agents.values()})


def job_json(job: JobSummary) -> dict[str, Any]:
    """A job with its counts, when its first task started, and an ETA at its rate so far."""
    done = sum(n for s, n in job.counts.items() if TaskState(s).is_final)
    eta: float | None = None
    if job.started_at is not None and 0 < done < job.total:
        rate = done / max(time.time() - job.started_at, 1e-3)
        eta = (job.total - done) / rate
    return {
        "id": job.id,
        "name": job.name,
        "created_at": job.created_at,
        "started_at": job.started_at,
        "counts": job.counts,
        "total": job.total,
        "done": done,
        "finished": job.finished,
        "failed": job.failed,
        "eta_s": 0.0 if job.finished else eta,
    }


def task_json(coord: Coordinator, record: TaskRecord) -> dict[str, Any]:
    """A task as the API shows it, with why it waits when the coordinator knows."""
    reason = coord.waiting_reason(record)
    data = record.model_dump(mode="json")
    if record.command is not None and record.command.secret_env:
        data["command"] = record.command.shown().model_dump(mode="json")
    if reason is not None:
        data["waiting_reason"] = reason
    return data
