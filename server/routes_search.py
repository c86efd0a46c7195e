"""Search, indexed images (thumbnails) and the web page.

``GET /api/images/<id>`` serves only the bytes that were indexed: ``engine.source_bytes`` reads them
from the image's file (or tar member) and checks their size and SHA-256 against the index, so a file
replaced, edited, or swapped for a symlink to something else is a 404 ``not_found``. The response
type comes from the bytes' signature (JPEG, PNG, GIF, WebP, BMP); other images (TIFF ...) and tar
members are served as a JPEG rendition. Thumbnails are rendered from the same checked bytes and cached.
"""

from __future__ import annotations

import mimetypes
import re

from flask import Blueprint, current_app, jsonify, request

from retrieval.errors import UnknownIdError
from server.common import get_engine, result_json, state
from server.errors import BadRequestError
from server.requests import search_request
from server.thumbnails import MAX_SIZE, MIN_SIZE, make_thumbnail

bp = Blueprint("search", __name__)

_ID = re.compile(r"^[0-9a-f]{15}$")
CACHE = "public, max-age=86400, immutable"   # ids are content hashes


def web_image_type(data: bytes) -> str | None:
    """The MIME type of an image a browser shows, from its leading bytes; ``None`` for anything else."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith(b"BM") and len(data) > 26:
        return "image/bmp"
    return None


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
    from retrieval.regions.search import response_regions_json, with_box

    describe = with_box(lambda h: result_json(engine, h, q))    # region hits say where ("box")
    return jsonify({
        "results": [describe(h) for h in resp.hits],
        "offset": q.offset,
        "took_ms": round(resp.took_ms, 2),
        "encoder": resp.encoder,
        "score_kind": resp.score_kind,         # cosine | fused_z | reranked (retrieval.engine.query.SCORE_KINDS)
        "timings": {k: round(v, 2) for k, v in resp.timings.items()},
        **({"notes": resp.notes} if resp.notes else {}),
        **response_regions_json(resp, describe),      # "box", "regions", "query_size" (docs/regions.md)
    })


@bp.get("/api/images/<image_id>")
def api_image(image_id: str):
    if not _ID.match(image_id):
        raise UnknownIdError(f"unknown image id {image_id!r}")
    engine = get_engine()
    size_arg = request.args.get("size")
    source = None
    if size_arg is None:
        source = engine.source_bytes(image_id)       # the indexed bytes, checked; 404 if changed or gone
        mime = web_image_type(source) if engine.metadata(image_id).get("path") else None   # tar member: a JPEG
        if mime is not None:
            resp = current_app.response_class(source, mimetype=mime)
            resp.headers["Cache-Control"] = CACHE
            resp.set_etag(image_id)
            return resp.make_conditional(request, accept_ranges=True, complete_length=len(source))
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
    data = cache.get(key)            # a thumbnail once rendered from the checked bytes
    if data is None:
        engine.locate(image_id)          # 404 before touching files
        if source is not None:
            from retrieval.images import load_image

            image = load_image(source, min_side=size)     # a big original decoded reduced (JPEG draft)
        else:
            image = engine.load_image(image_id)    # checked like source_bytes
        data = make_thumbnail(image, size)
        cache.put(key, data)
    resp = current_app.response_class(data, mimetype="image/jpeg")
    resp.headers["Cache-Control"] = CACHE
    resp.headers["ETag"] = f'"{image_id}-{size}"'
    return resp


mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")
