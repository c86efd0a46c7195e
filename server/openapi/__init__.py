"""``GET /openapi.json`` (the OpenAPI 3.0 document of the HTTP API, :func:`build_spec`) and ``GET /docs`` (it,
rendered by Swagger UI from the ``swagger-ui-bundle`` package, served by this server: no CDN, works offline).

Request bodies are generated from the request dataclasses the server validates with
(:mod:`server.openapi.schemas`); responses and routes are described in :mod:`server.openapi.spec`.
Without ``swagger-ui-bundle`` installed, ``/docs`` is a plain HTML list of the operations.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

from flask import Blueprint, Response, abort, current_app, send_from_directory

from server.openapi.spec import build_spec

__all__ = ["bp", "build_spec", "spec_json"]

bp = Blueprint("openapi", __name__)

#: the Swagger UI files /docs loads (nothing else of the bundle is served)
UI_FILES = ("swagger-ui.css", "swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "favicon-32x32.png")
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Loupe API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css">
<link rel="icon" href="/docs/static/favicon-32x32.png"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script></body></html>
"""

INIT = """window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout", validatorUrl: null,
  supportedSubmitMethods: ["get", "post"]});
"""


def _version() -> str:
    try:
        from loupe import __version__

        return str(__version__)
    except Exception:  # noqa: BLE001 - the library without the loupe package
        return "0"


@lru_cache(maxsize=1)
def spec_json() -> str:
    """The document as JSON text (built once per process: the dataclasses do not change)."""
    return json.dumps(build_spec(_version()), indent=1)


def swagger_ui_dir() -> Path | None:
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() else None


@bp.get("/openapi.json")
def openapi_json():
    return Response(spec_json(), mimetype="application/json", headers={"Cache-Control": "no-cache"})


@bp.get("/docs")
def docs_page():
    body = PAGE if swagger_ui_dir() is not None else _plain_page()
    return Response(body, mimetype="text/html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@bp.get("/docs/init.js")
def docs_init():
    return Response(INIT, mimetype="text/javascript")


@bp.get("/docs/static/<name>")
def docs_static(name: str):
    folder = swagger_ui_dir()
    if folder is None or name not in UI_FILES:
        abort(404)
    resp = send_from_directory(folder, name, max_age=86400)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _plain_page() -> str:
    """The operations as an HTML list (no Swagger UI installed)."""
    spec = json.loads(spec_json())
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            rows.append(f"<li><code>{method.upper()} {html.escape(path)}</code>: {html.escape(op['summary'])}</li>")
    current_app.logger.debug("swagger-ui-bundle is not installed: /docs is a plain list")
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Loupe API</title></head><body>"
            "<h1>Loupe API</h1><p>The full description: <a href='/openapi.json'>/openapi.json</a> "
            "(install swagger-ui-bundle for an interactive page).</p><ul>" + "".join(rows) + "</ul></body></html>")
