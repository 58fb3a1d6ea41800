"""API tokens: ``POST /v1/tokens`` (``{"role", "name", "ttl_s"}``: the token is in
the answer, once), ``GET /v1/tokens`` (never a secret nor its digest) and
``DELETE /v1/tokens/{id}`` (revoked at once, and the WebSockets it opened closed).
Admin only (see :mod:`herder.coordinator.auth`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from herder.model import TokenRecord

if TYPE_CHECKING:
    from .service import Coordinator

MAX_TTL_S = 10 * 365 * 86400.0


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["read", "submit", "admin", "agent"]
    name: str | None = Field(default=None, max_length=256)
    ttl_s: float | None = Field(default=None, gt=0, le=MAX_TTL_S)


def token_json(record: TokenRecord) -> dict[str, Any]:
    return record.model_dump(exclude={"digest"})


def token_router(coord: Coordinator) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/tokens")
    async def list_tokens() -> list[dict[str, Any]]:
        return [token_json(t) for t in coord.auth.tokens()]

    @router.post("/v1/tokens", status_code=201)
    async def create(body: TokenIn) -> dict[str, Any]:
        token, record = await coord.auth.create(
            body.role, body.name, body.ttl_s, coord.fingerprint, coord.url
        )
        return {**token_json(record), "token": token.encode()}

    @router.delete("/v1/tokens/{token_id}")
    async def revoke(token_id: str) -> dict[str, Any]:
        record = await coord.auth.revoke(token_id)
        if record is None:
            raise HTTPException(404, f"no token {token_id}")
        closed = await coord.close_sessions_of(token_id)
        return {**token_json(record), "sessions_closed": closed}

    return router
