"""Fleet routes: the policy and its count, draining and terminating nodes.

``GET /v1/fleet``, ``POST /v1/fleet/scale`` (``{"target": N}``, or ``null``
to go back to the herd's own policy), ``POST /v1/nodes/{id}/drain`` and
``POST /v1/nodes/{id}/terminate``. A refused request (unknown node, a count
above ``max_nodes``) changes nothing and says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from herder.errors import HerderError
from herder.model import NodeState

if TYPE_CHECKING:
    from .service import Coordinator


class ScaleIn(BaseModel):
    target: int | None = Field(ge=0)


def fleet_router(coord: Coordinator) -> APIRouter:
    router = APIRouter()
    fleet = coord.fleet

    @router.get("/v1/fleet")
    async def describe() -> dict[str, Any]:
        herd = fleet.herd
        nodes = await coord.store.nodes(alive_only=True)
        counts: dict[str, int] = {}
        for node in nodes:
            counts[node.state.value] = counts.get(node.state.value, 0) + 1
        return {
            "herd": type(herd).__module__ + ":" + type(herd).__qualname__,
            "provider": fleet.provider.name if fleet.provider else None,
            "target": fleet.target,
            "policy": "target" if fleet.target is not None else "autoscale",
            "min_nodes": herd.min_nodes,
            "max_nodes": herd.max_nodes,
            "nodes": counts,
            "staying": sum(n for s, n in counts.items() if s != NodeState.DRAINING.value),
        }

    @router.post("/v1/fleet/scale")
    async def scale(body: ScaleIn) -> dict[str, Any]:
        try:
            await fleet.scale(body.target)
        except HerderError as exc:
            raise HTTPException(422, f"target: {exc}") from exc
        return {"target": fleet.target}

    @router.post("/v1/nodes/{node_id}/drain")
    async def drain(node_id: str) -> dict[str, Any]:
        await _act(fleet.drain, node_id)
        return {"node": node_id, "draining": True}

    @router.post("/v1/nodes/{node_id}/terminate")
    async def terminate(node_id: str) -> dict[str, Any]:
        await _act(fleet.terminate, node_id)
        return {"node": node_id, "terminated": True}

    return router


async def _act(action: Any, node_id: str) -> None:
    try:
        await action(node_id)
    except HerderError as exc:
        raise HTTPException(getattr(exc, "status", 422), str(exc)) from exc
