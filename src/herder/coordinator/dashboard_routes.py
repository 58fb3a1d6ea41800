"""The dashboard's files: ``GET /`` and ``GET /static/{name}``.

The files live in the ``herder.web`` package, a face that the coordinator
must not import; they are found with ``importlib.resources`` by name instead.
``plotly.min.js`` comes from the installed plotly package (about 4.8 MB, so
it is sent with a long ``Cache-Control``; the app gzips it). None of these
files carries data, so they need no token: every data call of the page
carries one.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.util
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",  # ES modules need a JavaScript type
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Our own files change with each release of herder: the browser revalidates them.
APP_CACHE = "no-cache"
# plotly.min.js changes only with the plotly package; a month saves 4.8 MB a visit.
PLOTLY_CACHE = "public, max-age=2592000"


def _static_dir() -> Traversable:
    return files("herder.web") / "static"


def _static_file(name: str) -> Traversable:
    """The named file of ``herder.web/static``; 404 for anything else."""
    if not name or "/" in name or "\\" in name or ".." in name or name.startswith("."):
        raise HTTPException(404, "no such file")
    suffix = Path(name).suffix
    if suffix not in MEDIA_TYPES:
        raise HTTPException(404, "no such file")
    known = {entry.name for entry in _static_dir().iterdir() if entry.is_file()}
    if name not in known:
        raise HTTPException(404, "no such file")
    return _static_dir() / name


def plotly_js_path() -> Path | None:
    """Where the installed plotly package keeps ``plotly.min.js``, if it is installed."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    return None


def _gzip(path: Path) -> bytes:
    return gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)


def dashboard_router() -> APIRouter:
    router = APIRouter()

    def _send(name: str) -> Response:
        entry = _static_file(name)
        media_type = MEDIA_TYPES[Path(name).suffix]
        return Response(
            entry.read_bytes(), media_type=media_type, headers={"Cache-Control": APP_CACHE}
        )

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return _send("index.html")

    gzipped: list[bytes] = []  # plotly.min.js compressed once, on the first ask

    # Declared before the generic route so that it wins.
    @router.get("/static/plotly.min.js", include_in_schema=False)
    async def plotly_js(request: Request) -> Response:
        path = plotly_js_path()
        if path is None:
            raise HTTPException(404, "plotly is not installed on the coordinator")
        headers = {"Cache-Control": PLOTLY_CACHE, "Vary": "Accept-Encoding"}
        if "gzip" not in request.headers.get("accept-encoding", ""):
            return FileResponse(path, media_type=MEDIA_TYPES[".js"], headers=headers)
        if not gzipped:  # 4.8 MB -> about 1.4 MB: a first visit over a slow link
            gzipped.append(await asyncio.to_thread(_gzip, path))
        return Response(
            gzipped[0],
            media_type=MEDIA_TYPES[".js"],
            headers={**headers, "Content-Encoding": "gzip"},
        )

    @router.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return _send(name)

    return router
