"""``GET /docs``: the API's Swagger UI with no internet: its script and styles (Swagger UI 5, which
reads FastAPI's OpenAPI 3.1) come from the ``fastapi-offline`` package's static folder, mounted at
``/docs-assets``, not from FastAPI's default CDN. ``/openapi.json`` (FastAPI's) describes every endpoint."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

LOG = logging.getLogger(__name__)

ASSETS = "/docs-assets"


def mount_docs(app: FastAPI) -> bool:
    """Add ``/docs`` and its assets to ``app``; False (no docs page) without ``fastapi-offline``."""
    try:
        from importlib.resources import files

        static = files("fastapi_offline") / "static"
    except ImportError:  # ModuleNotFoundError
        LOG.info("fastapi-offline is not installed: no /docs page (/openapi.json still describes the API)")
        return False
    app.mount(ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{ASSETS}/favicon.png")
    return True
