"""The dashboard: `GET /` redirects to `/ui/`, `GET /ui/` is the page, `/ui/static/...`
its assets (the files of the `service.ui` package, bundled with it).

The page is plain HTML and JavaScript over the public API (`GET /v1/sessions`, `.../{id}`,
`.../history`, `.../schedule.png`), so it needs no authentication of its own: the page
asks for an API key when the API answers 401 and sends it as `Authorization: Bearer`.
None of these routes is part of the API: they stay out of the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response
from starlette.exceptions import HTTPException

router = APIRouter(include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "ui"

#: the assets served, by the name under /ui/static/, with their media type
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "vendor/uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "vendor/uPlot.min.css": "text/css; charset=utf-8",
    "vendor/uPlot.LICENSE": "text/plain; charset=utf-8",
}


def _file(name: str, media_type: str, cache: str) -> Response:
    return Response(
        (UI_DIR / name).read_bytes(), media_type=media_type, headers={"Cache-Control": cache}
    )


@router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui")
async def ui_no_slash() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/")
async def ui_index() -> Response:
    return _file("index.html", "text/html; charset=utf-8", "no-cache")


@router.get("/ui/static/{name:path}")
async def ui_static(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, f"no such file: /ui/static/{name}")
    return _file(name, media_type, "no-cache")
