"""REST and WebSocket routes of the coordinator.

Every route but ``/v1/ca`` (the public CA certificate, needed to pin TLS)
requires a bearer token; agents authenticate by the mutual handshake on
``/v1/agent`` instead. Handlers are thin: they parse, call the service or
the store, and shape the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from herder import protocol
from herder.discovery.tracker import Registry, tracker_router
from herder.errors import StoreError, SubmissionError, TaskFileError
from herder.model import ID_PATTERN, ServiceRecord, gc_paused
from herder.taskfile import MAX_JOB_ID_LENGTH, TaskFileFormat, parse_tasks

from .auth import Principal, rule
from .bus import answer_send, bus_router
from .dashboard_routes import dashboard_router
from .data_routes import data_router
from .fleet_routes import fleet_router
from .guard import BodyLimit
from .hosts import HostGuard, local_names
from .leader import current_leader
from .live_routes import live_router
from .query_routes import job_json, query_router, task_json
from .release_routes import release_router
from .sessions import ClientSession
from .token_routes import token_router

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("herder.coordinator")


class CancelIn(BaseModel):
    task_ids: list[str] | None = None
    job_id: str | None = None


def _parse_submission(raw: bytes) -> protocol.JobSubmission:
    """A JSON submission; a bad one raises HTTPException naming the task and the field."""
    try:
        with gc_paused():
            return protocol.JobSubmission.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"])
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        message = str(first["msg"]).removeprefix("Value error, ")
        raise HTTPException(422, f"{where.lstrip('.') or 'body'}: {message}{more}") from exc


def create_app(coord: Coordinator) -> FastAPI:
    # The API's description is served like any read route (below), not by FastAPI's
    # own public /openapi.json and /docs.
    app = FastAPI(title="herder coordinator", version="1", openapi_url=None, docs_url=None,
                  redoc_url=None)  # fmt: skip

    def authenticated(request: Request) -> None:
        """The route's rule (herder.coordinator.auth.RULES) against the bearer's role."""
        route = request.scope.get("route")
        needed = rule(request.method, getattr(route, "path", request.url.path))
        if "public" in needed:
            return
        source = request.client.host if request.client else "?"
        if coord.auth.throttled(source):
            raise HTTPException(429, "too many failed authentications from here: wait a minute")
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        who = coord.auth.principal(token) if scheme.lower() == "bearer" else None
        if who is None:
            coord.auth.failed(source)
            raise HTTPException(401, "a valid bearer token is required")
        if not who.may(needed):
            raise HTTPException(
                403, f"the {who.role} role may not {request.method} {request.url.path}"
            )
        request.state.principal = who

    auth = [Depends(authenticated)]

    @app.exception_handler(StoreError)
    async def _store_down(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})

    app.include_router(data_router(coord), dependencies=auth)
    app.include_router(fleet_router(coord), dependencies=auth)
    app.include_router(release_router(coord), dependencies=auth)
    app.include_router(query_router(coord), dependencies=auth)
    app.include_router(token_router(coord), dependencies=auth)
    settings = coord.settings
    advertised = [coord.url, *([settings.advertise_url] if settings.advertise_url else [])]
    allowed = local_names(settings.listen_host, advertised) | set(settings.allowed_hosts)
    app.add_middleware(HostGuard, allowed=allowed)
    app.add_middleware(BodyLimit, limit=int(settings.max_body_mb * 2**20))
    app.include_router(live_router(coord))  # authenticated by its first message
    app.include_router(dashboard_router(), dependencies=auth)  # public: files without data
    app.include_router(bus_router(coord), dependencies=auth)
    if coord.discovery.serve_tracker:  # authenticated by HMAC per call, not by bearer
        app.include_router(tracker_router(coord.secret, Registry()))

    @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
    async def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/v1/ca", dependencies=auth)
    async def ca() -> Response:
        return Response(coord.ca_pem, media_type="application/x-pem-file")

    @app.get("/v1/health", dependencies=auth)
    async def health() -> dict[str, Any]:
        return {"ok": True, "url": coord.url, "stopping": coord.is_stopping}

    @app.get("/v1/status", dependencies=auth)
    async def status(
        window_s: Annotated[float, Query(gt=0, le=86_400)] = 10.0,
    ) -> dict[str, Any]:
        import time

        stats = coord.statistics()
        nodes = await coord.store.nodes()
        done = await coord.store.finished_since(time.time() - window_s)
        leader = await current_leader(coord.store)
        return {
            "url": coord.url,
            # several coordinators on one store: this one, and the fleet's leader
            "coordinator": {"id": coord.id, "leader": coord.leadership.is_leader},
            "leader": None if leader is None else dataclasses.asdict(leader),
            "counts": await coord.counts(),
            "nodes": {s: sum(1 for n in nodes if n.state == s) for s in {n.state for n in nodes}},
            "agents": stats.agents,
            "throughput": done / window_s,
            "uptime_s": time.time() - stats.started_at,
        }

    @app.post("/v1/tasks", dependencies=auth)
    async def submit(request: Request) -> dict[str, Any]:
        # Parsed and checked in a thread: a 100,000-task file takes a second or
        # more of pydantic work, which must not stall heartbeats and results.
        body = await asyncio.to_thread(_parse_submission, await request.body())
        specs = body.tasks
        try:
            await coord.submit(
                body.job_id, body.job_name, specs, None, owner=request.state.principal.owner
            )
        except SubmissionError as exc:
            raise _refused(exc, str(exc)) from exc
        return {"job_id": body.job_id, "task_ids": [s.id for s in specs]}

    @app.post("/v1/push", dependencies=auth)
    async def push(
        request: Request,
        fmt: Annotated[TaskFileFormat, Query(alias="format")],
        source: Annotated[str, Query(min_length=1)],
        job_id: Annotated[str, Query(pattern=ID_PATTERN, max_length=MAX_JOB_ID_LENGTH)],
    ) -> dict[str, Any]:
        """A tasks file as written, checked and stored here as one job (all or nothing).

        Parsing here rather than in the CLI spares a second validation and a
        JSON round of every task: a 100,000-task file is pushed in less time.
        The client names the job, and task ids follow from it and the names,
        so a push resent after a lost answer is stored once.
        """
        raw = await request.body()
        try:
            text = raw.decode("utf-8-sig")
            parsed = await asyncio.to_thread(
                parse_tasks, text, fmt=fmt, source=source, job_id=job_id
            )
        except UnicodeDecodeError as exc:
            raise HTTPException(422, f"{source}: not UTF-8 text (byte {exc.start})") from exc
        except TaskFileError as exc:
            raise HTTPException(422, str(exc)) from exc
        job_name = parsed.job_name or PurePath(source).name
        try:
            await coord.submit(
                job_id, job_name, parsed.specs, None, owner=request.state.principal.owner
            )
        except SubmissionError as exc:
            raise _refused(exc, f"{source}: {exc}") from exc
        return {"job_id": job_id, "tasks": len(parsed.specs)}

    @app.get("/v1/tasks/{task_id}", dependencies=auth)
    async def get_task(task_id: str) -> dict[str, Any]:
        record = await coord.store.task(task_id)
        if record is None:
            raise HTTPException(404, f"no task {task_id}")
        return {
            "task": task_json(coord, record),
            "attempts": [a.model_dump(mode="json") for a in await coord.store.attempts(task_id)],
            "events": [
                e.model_dump(mode="json")
                for e in await coord.store.events(task_id=task_id, limit=1000)
            ],
            "live": coord.logs.tails(task_id),
            "progress": p.as_json() if (p := coord.bus.progress.get(task_id)) else None,
        }

    @app.post("/v1/cancel", dependencies=auth)
    async def cancel(body: CancelIn, request: Request) -> dict[str, Any]:
        if body.task_ids is None and body.job_id is None:
            raise HTTPException(422, "give task_ids or job_id")
        who: Principal = request.state.principal
        if who.role != "admin":  # a submitter cancels what it submitted, nothing else
            owners = await coord.store.job_owners(body.task_ids, body.job_id)
            if owners - {who.token_id}:
                raise HTTPException(403, "only the jobs this token submitted can be cancelled")
        return {"cancelled": await coord.cancel(body.task_ids, body.job_id)}

    @app.get("/v1/jobs", dependencies=auth)
    async def list_jobs(limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
        return [job_json(j) for j in await coord.store.jobs(limit)]

    @app.get("/v1/nodes", dependencies=auth)
    async def list_nodes() -> list[dict[str, Any]]:
        out = []
        for n in await coord.store.nodes():
            d = n.model_dump(mode="json")
            live = coord.agents.get(n.id)
            d["running"] = len(live.outstanding) if live else 0
            d["available"] = n.id not in coord.bus.paused
            out.append(d)
        return out

    @app.get("/v1/services", dependencies=auth)
    async def list_services(ended: bool = False) -> list[dict[str, Any]]:
        """Services kept running (``ended``: cancelled ones too), with live health."""
        return [_service_json(r, h) for r, h in await coord.services(ended=ended)]

    @app.get("/v1/events", dependencies=auth)
    async def list_events(
        after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,  # an event id: a 64-bit integer
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    ) -> list[dict[str, Any]]:
        return [
            e.model_dump(mode="json") for e in await coord.store.events(after=after, limit=limit)
        ]

    @app.post("/v1/shutdown", dependencies=auth)
    async def shutdown() -> dict[str, Any]:
        coord.stop()
        return {"stopping": True}

    @app.websocket("/v1/agent")
    async def agent_ws(ws: WebSocket) -> None:
        await coord.serve_agent(ws)

    @app.websocket("/v1/session")
    async def session_ws(ws: WebSocket) -> None:
        header = ws.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        who = coord.auth.principal(token) if scheme.lower() == "bearer" else None
        if who is None or not who.may(rule("WS", "/v1/session")):
            await ws.close(4401, "a valid bearer token is required")
            return
        await ws.accept()
        client = ClientSession(ws=ws, principal=who)
        coord.clients.add(client)
        from .service import close_ws, receive_frame

        try:
            while True:
                # The frame is handled by a call of its own: while the next one
                # is awaited, nothing holds the last (a 10,000-task Submit is
                # ~20 MB of objects) and the coordinator's memory stays flat.
                await _handle_session_frame(coord, client, who, await receive_frame(ws))
        except protocol.ProtocolError as exc:
            await close_ws(ws, 4400, str(exc))
        except Exception as exc:
            from .service import _is_disconnect

            if not _is_disconnect(exc):
                raise
        finally:
            client.closed = True
            coord.clients.discard(client)
            coord.unwatch_all(client)

    return app


async def _handle_session_frame(
    coord: Coordinator, client: ClientSession, who: Principal, frame: bytes | str
) -> None:
    """Act on one frame of a client's session: submissions, sends, watches."""
    for msg in protocol.decode_client(frame):
        if isinstance(msg, protocol.Submit):
            error = None
            try:
                if not who.may(frozenset({"submit"})):
                    raise SubmissionError(f"the {who.role} role may not submit")
                await coord.submit(msg.job_id, msg.job_name, msg.tasks, client, owner=who.owner)
            except SubmissionError as exc:
                error = str(exc)
            await client.send(protocol.Submitted(req=msg.req, error=error))
        elif isinstance(msg, protocol.Send):
            await answer_send(coord, client, msg)
        elif isinstance(msg, protocol.Unwatch):
            coord.unwatch(client, msg.task_ids)
        else:
            coord.watch(client, msg.task_ids)
            finals = await coord.store.finals(msg.task_ids)
            coord._notify(finals)


def _service_json(record: ServiceRecord, health: protocol.HealthReport | None) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "job": record.job_id,
        "state": record.state.value,
        "node": record.node_id,
        "restarts": record.restarts,
        "started_at": record.started_at,
        "health": None
        if health is None
        else {
            "state": health.state,
            "checked_at": health.checked_at,
            "error": health.error,
            "failures": health.failures,
        },
        "last_exit": None if record.last_exit is None else record.last_exit.model_dump(),
        "restart_at": record.restart_at,
        "check": record.spec.model_dump(exclude_defaults=True),
    }


def _refused(exc: SubmissionError, detail: str) -> HTTPException:
    """A refused submission as HTTP: 422 for bad input; 503 (store down, shutting
    down) with ``Retry-After``, so a client knows to send it again."""
    status = getattr(exc, "status", 422)
    headers = {"Retry-After": "1"} if status == 503 else None
    return HTTPException(status, detail, headers=headers)
