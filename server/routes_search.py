"""Search, indexed images (thumbnails) and the web page."""

from __future__ import annotations

import mimetypes
import re

from flask import Blueprint, current_app, jsonify, request, send_file

from retrieval.errors import UnknownIdError
from server.common import get_engine, result_json, state
from server.errors import BadRequestError
from server.requests import search_request
from server.thumbnails import MAX_SIZE, MIN_SIZE, make_thumbnail

bp = Blueprint("search", __name__)

_ID = re.compile(r"^[0-9a-f]{15}$")
WEB_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
             ".webp": "image/webp", ".bmp": "image/bmp"}
CACHE = "public, max-age=86400, immutable"   # ids are content hashes


@bp.get("/")
def index_page():
    resp = current_app.send_static_file("index.html")
    resp.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.post("/api/search")
def api_search():
    q = search_request(request)
    engine = get_engine()
    resp = engine.search(q)
    metrics = state()["metrics"]
    for stage, ms in resp.timings.items():
        metrics.search_stage.labels(stage.removesuffix("_ms")).observe(ms / 1e3)
    return jsonify({
        "results": [result_json(engine, h, q) for h in resp.hits],
        "took_ms": round(resp.took_ms, 2),
        "encoder": resp.encoder,
        "timings": {k: round(v, 2) for k, v in resp.timings.items()},
        **({"notes": resp.notes} if resp.notes else {}),
    })


@bp.get("/api/images/<image_id>")
def api_image(image_id: str):
    if not _ID.match(image_id):
        raise UnknownIdError(f"unknown image id {image_id!r}")
    engine = get_engine()
    size_arg = request.args.get("size")
    if size_arg is None:
        try:
            path = engine.source_file(image_id)
        except UnknownIdError:
            path = None           # not a plain file (e.g. a tar member): serve a JPEG rendition
        mime = WEB_TYPES.get(path.suffix.lower()) if path is not None else None
        if mime is not None:
            resp = send_file(path, mimetype=mime, conditional=True, max_age=86400)
            resp.headers["Cache-Control"] = CACHE
            return resp
        size = MAX_SIZE          # TIFF etc.: serve a browser-friendly JPEG
    else:
        try:
            size = int(size_arg)
        except ValueError:
            raise BadRequestError(f"size must be an integer in {MIN_SIZE}..{MAX_SIZE}") from None
        if not MIN_SIZE <= size <= MAX_SIZE:
            raise BadRequestError(f"size must be an integer in {MIN_SIZE}..{MAX_SIZE}")
    cache = state()["thumbnails"]
    key = (image_id, size)
    data = cache.get(key)
    if data is None:
        engine.locate(image_id)          # 404 before touching files
        data = make_thumbnail(engine.load_image(image_id), size)
        cache.put(key, data)
    resp = current_app.response_class(data, mimetype="image/jpeg")
    resp.headers["Cache-Control"] = CACHE
    resp.headers["ETag"] = f'"{image_id}-{size}"'
    return resp


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
