"""The API's documentation pages, /docs (Swagger UI) and /redoc, with every asset served by
this service: they work offline and behind a firewall, and load nothing from a CDN. The
assets come from the fastapi-offline package, which bundles Swagger UI and ReDoc."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from services.errors import NotFound

router = APIRouter(include_in_schema=False)

_ASSETS = Path(str(files("fastapi_offline") / "static"))
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}
_PREFIX = "/docs/assets"
# The pages' own inline start-up scripts run; anything from another host does not (ReDoc's
# sidebar would fetch its vendor's logo from a CDN otherwise). ReDoc searches in a worker.
_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; font-src 'self' data:"
)


def _own_assets_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = _POLICY
    return page


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return _own_assets_only(
        get_swagger_ui_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - API",
            swagger_js_url=f"{_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{_PREFIX}/favicon.png",
        )
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return _own_assets_only(
        get_redoc_html(
            openapi_url=request.app.openapi_url,
            title=f"{request.app.title} - API",
            redoc_js_url=f"{_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{_PREFIX}/favicon.png",
            with_google_fonts=False,
        )
    )


@router.get(_PREFIX + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = _ASSET_TYPES.get(name)
    if media_type is None:
        raise NotFound("No such documentation asset")
    return FileResponse(
        _ASSETS / name,
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400"},
    )
