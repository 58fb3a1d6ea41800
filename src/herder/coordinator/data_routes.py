"""Datastore routes: put, get, list, inspect and remove objects over HTTPS.

``PUT|GET|DELETE /v1/data/{key}``, ``GET /v1/data-info/{key}`` and
``GET /v1/data?prefix=``. app.py includes this router behind the same bearer
check as every other ``/v1`` route.

Bodies stream both ways in bounded memory. A PUT runs
:meth:`Datastore.put_stream` in a worker thread, which pulls the request body
from the event loop about a MiB at a time (uvicorn stops reading the socket
while a chunk waits, so a fast sender cannot fill memory). A GET hands the
datastore's chunks to the response one at a time. Errors are
``{"error": message}`` with 400 (bad key), 404 (missing), 507 (full), 503
(storage unreachable), 408 (the body stalled).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

import anyio
import anyio.from_thread
import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import ClientDisconnect

from herder.datastore import ObjectInfo, check_key, check_prefix
from herder.errors import (
    BadKey,
    DatastoreError,
    DatastoreFull,
    DatastoreUnavailable,
    ObjectMissing,
)

if TYPE_CHECKING:
    from .service import Coordinator

log = logging.getLogger("herder.coordinator")

BLOCK = 1 << 20
"""Request-body bytes handed to the writing thread at a time."""

BODY_IDLE_S = 60.0
"""A PUT whose body sends nothing for this long is dropped (408)."""

DRAIN_LIMIT = 64 << 20
DRAIN_S = 10.0
"""After refusing a PUT, read (and drop) up to this much of the body for up to this long, so
that the client, still sending, reads the error instead of a reset connection."""


class _KeyConvertor(PathConvertor):
    """Like ``{x:path}`` but matching any character, so that a key holding a control
    character reaches the key check (400, naming the rule) instead of missing every route."""

    regex = "(?s:.*)"


register_url_convertor("datakey", _KeyConvertor())

_STATUS: list[tuple[type[DatastoreError], int]] = [
    (BadKey, 400),
    (ObjectMissing, 404),
    (DatastoreFull, 507),
    (DatastoreUnavailable, 503),
]


def _error(exc: DatastoreError) -> JSONResponse:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


class _BodyStalled(Exception):
    """The client stopped sending the request body."""


class _Body:
    """A request body handed to a worker thread in blocks of about :data:`BLOCK` bytes."""

    def __init__(self, request: Request) -> None:
        self._stream = request.stream().__aiter__()
        self.done = False
        self.received = 0

    async def next_block(self) -> bytes:
        """The next block, or ``b""`` at the end of the body."""
        parts: list[bytes] = []
        size = 0
        while size < BLOCK and not self.done:
            with anyio.move_on_after(BODY_IDLE_S) as scope:
                try:
                    chunk = await self._stream.__anext__()
                except StopAsyncIteration:
                    self.done = True
                    break
            if scope.cancelled_caught:
                raise _BodyStalled(f"the request body sent nothing for {BODY_IDLE_S:.0f}s")
            parts.append(chunk)
            size += len(chunk)
        self.received += size
        return b"".join(parts)

    def chunks(self) -> Iterator[bytes]:
        """The body as a plain iterator, for the worker thread (it calls into the loop)."""
        while block := anyio.from_thread.run(self.next_block):
            yield block

    async def drain(self) -> None:
        limit = self.received + DRAIN_LIMIT
        with anyio.move_on_after(DRAIN_S), contextlib.suppress(ClientDisconnect, _BodyStalled):
            while not self.done and self.received < limit:
                await self.next_block()


async def _stream(key: str, chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    try:
        while True:
            block = await anyio.to_thread.run_sync(next, chunks, None)
            if block is None:
                return
            yield block
    except DatastoreError as exc:
        # The status line is gone: breaking the connection is the only way to tell.
        log.warning("datastore read of %s broke off: %s", key, exc)
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def _info_headers(info: ObjectInfo) -> dict[str, str]:
    return {
        "Content-Length": str(info.size),
        "X-Herder-Sha256": info.sha256,
        "X-Herder-Modified": repr(info.modified),
    }


def data_router(coord: Coordinator) -> APIRouter:
    """The datastore routes over ``coord.datastore`` (authentication is added by the caller)."""
    router = APIRouter()

    @router.put("/v1/data/{key:datakey}", status_code=201)
    async def put_object(key: str, request: Request) -> Response:
        body = _Body(request)
        try:
            check_key(key)
            info = await anyio.to_thread.run_sync(coord.datastore.put_stream, key, body.chunks())
        except DatastoreError as exc:
            await body.drain()
            return _error(exc)
        except _BodyStalled as exc:
            return JSONResponse({"error": f"put {key!r}: {exc}"}, status_code=408)
        except ClientDisconnect:
            # The client went away (or the server is stopping): the answer rarely reaches
            # anyone, but if it does it must not read as success or as a bad key.
            log.info("datastore put of %s abandoned mid-body; nothing was kept", key)
            return JSONResponse(
                {"error": f"put {key!r}: the connection closed mid-body; nothing was kept"},
                status_code=503,
            )
        return JSONResponse(info.to_json(), status_code=201)

    @router.get("/v1/data/{key:datakey}")
    async def get_object(key: str) -> Response:
        try:
            info, chunks = await anyio.to_thread.run_sync(coord.datastore.open_read, key)
        except DatastoreError as exc:
            return _error(exc)
        return StreamingResponse(
            _stream(key, chunks),
            media_type="application/octet-stream",
            headers=_info_headers(info),
        )

    @router.get("/v1/data-info/{key:datakey}")
    async def object_info(key: str) -> Response:
        try:
            info = await anyio.to_thread.run_sync(coord.datastore.info, key)
        except DatastoreError as exc:
            return _error(exc)
        return JSONResponse(info.to_json(), headers={"X-Herder-Sha256": info.sha256})

    @router.get("/v1/data")
    async def list_objects(prefix: str = "") -> Response:
        try:
            check_prefix(prefix)
            found = await anyio.to_thread.run_sync(coord.datastore.ls, prefix)
        except DatastoreError as exc:
            return _error(exc)
        return JSONResponse([i.to_json() for i in found])

    @router.delete("/v1/data/{key:datakey}", status_code=204)
    async def remove_object(key: str) -> Response:
        try:
            await anyio.to_thread.run_sync(coord.datastore.rm, key)
        except DatastoreError as exc:
            return _error(exc)
        return Response(status_code=204)

    return router
