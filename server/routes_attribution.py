"""``POST /api/attribution``: why a result matched a query, as a PNG overlay or heatmap JSON.

Fields: the search query fields (``text`` / ``image`` / ``image_id`` / ``instruction`` / ``encoder`` /
``rerank``) plus ``result_id`` (required), and optionally ``format`` (``"png"`` default, or
``"json"`` → ``{"width", "height", "heatmap": [[...]], "method", "encoder", "result_id"}``),
``attribution_method`` (``auto|tokens|gradcam|cam|gradinput|integrated|eigencam|occlusion|matches|colour``),
``side`` (``result`` default, or ``query`` for the query image's map of an image query), ``alpha``
(overlay opacity, 0..1) and ``max_side`` (JSON only: shrink the heatmap so its longer side is at most this).
"""

from __future__ import annotations

import re

from flask import Blueprint, current_app, jsonify, request

from retrieval.errors import InvalidQueryError, UnknownIdError
from server.common import get_engine, parse_query
from server.errors import BadRequestError

bp = Blueprint("attribution", __name__)

_ID = re.compile(r"^[0-9a-f]{15}$")


def _option(extra: dict, name: str, default, allowed=None):
    value = extra.get(name, default)
    if value in (None, ""):
        return default
    if allowed is not None and value not in allowed:
        raise BadRequestError(f"{name} must be one of {', '.join(map(str, allowed))}")
    return value


def _number(extra: dict, name: str, default: float | None, lo: float, hi: float) -> float | None:
    value = extra.get(name)
    if value in (None, ""):
        return default
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BadRequestError(f"{name} must be a number") from None
    if not lo <= value <= hi:
        raise BadRequestError(f"{name} must be in {lo:g}..{hi:g}")
    return value


@bp.route("/api/attribution", methods=["POST", "GET"])
def api_attribution():
    from retrieval.explain.attribution import METHODS, explain
    from retrieval.explain.overlay import heatmap_json, overlay_png

    q = parse_query(request)
    result_id = q.extra.get("result_id")
    if not isinstance(result_id, str) or not result_id.strip():
        raise InvalidQueryError("missing result_id: the id of the result to explain")
    result_id = result_id.strip()
    if not _ID.match(result_id):
        raise UnknownIdError(f"unknown image id {result_id!r}")
    fmt = _option(q.extra, "format", "png", ("png", "json"))
    method = _option(q.extra, "attribution_method", "auto", METHODS)
    side = _option(q.extra, "side", "result", ("result", "query"))
    alpha = _number(q.extra, "alpha", 0.5, 0.0, 1.0)
    max_side = _number(q.extra, "max_side", None, 1, 100_000)
    engine = get_engine()
    engine.locate(result_id)                       # 404 before embedding anything
    ctx = engine.embed(**q.query_kwargs())
    ex = explain(engine, ctx, result_id, method=method, rerank=q.rerank, query_side=(side == "query"))
    if side == "query":
        if ex.query is None:
            raise InvalidQueryError("side=query needs an image query (image or image_id)")
        heat, image = ex.query, ex.query_image
    else:
        heat, image = ex.result, ex.result_image
    if fmt == "json":
        body = heatmap_json(heat, max_side=int(max_side) if max_side else None)
        body.update({"method": ex.method, "encoder": ex.encoder, "result_id": result_id, "side": side})
        if ex.extra:
            body["details"] = ex.extra
        return jsonify(body)
    resp = current_app.response_class(overlay_png(image, heat, alpha=alpha), mimetype="image/png")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Attribution-Method"] = ex.method
    return resp
