"""Release routes: register, list, show, remove and roll out releases.

``POST /v1/releases`` registers a release whose bundle the client has
uploaded to ``/v1/data/releases/<id>/bundle.tar.gz`` (the coordinator
checks its size and sha256 against the manifest); ``GET /v1/releases``,
``GET /v1/releases/status`` (per node: installed and loading),
``GET /v1/releases/{id}``, ``DELETE /v1/releases/{id}`` (refused while
anything uses it) and ``POST /v1/releases/{id}/roll``. A refused request
changes nothing and says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, HTTPException, Response

from herder.errors import ReleaseError
from herder.releases.manifest import Manifest

if TYPE_CHECKING:
    from .service import Coordinator


def release_router(coord: Coordinator) -> APIRouter:
    router = APIRouter()
    catalog = coord.releases

    def described(manifest: Manifest) -> dict[str, Any]:
        return {**manifest.model_dump(), "fleet": manifest.id == catalog.fleet_release}

    @router.get("/v1/releases")
    async def list_releases() -> list[dict[str, Any]]:
        return [described(m) for m in await catalog.all()]

    @router.get("/v1/releases/status")
    async def status() -> dict[str, Any]:
        return {"fleet_release": catalog.fleet_release, "nodes": coord.release_status()}

    @router.post("/v1/releases", status_code=201)
    async def register(manifest: Manifest) -> dict[str, Any]:
        return described(await _checked(catalog.register(manifest)))

    @router.get("/v1/releases/{release_id}")
    async def show(release_id: str) -> dict[str, Any]:
        manifest = await _checked(catalog.manifest(release_id))
        return {
            **described(manifest),
            "users": await catalog.users(release_id),
            "nodes": [s["node"] for s in coord.release_status() if release_id in s["installed"]],
        }

    @router.delete("/v1/releases/{release_id}", status_code=204)
    async def remove(release_id: str) -> Response:
        await _checked(catalog.remove(release_id))
        return Response(status_code=204)

    @router.post("/v1/releases/{release_id}/roll")
    async def roll(release_id: str) -> dict[str, Any]:
        manifest = await _checked(coord.roll_release(release_id))
        return described(manifest)

    return router


async def _checked(work: Any) -> Any:
    """Await ``work``; a ReleaseError becomes an HTTP error with its status."""
    try:
        return await work
    except ReleaseError as exc:
        raise HTTPException(getattr(exc, "status", 422), str(exc)) from exc
