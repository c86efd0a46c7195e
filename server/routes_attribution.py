"""``POST /api/attribution``: why a result matched a query, as a PNG overlay or heatmap JSON.

Fields: the search query fields (``text`` / ``image`` / ``image_id`` / ``instruction`` / ``encoder`` /
``rerank``) plus ``result_id`` (required), and optionally ``format`` (``"png"`` default, or
``"json"`` → ``{"width", "height", "heatmap": [[...]], "method", "encoder", "result_id"}``),
``attribution_method`` (``auto|tokens|gradcam|cam|gradinput|integrated|eigencam|occlusion|matches|colour``),
``side`` (``result`` default, or ``query`` for the query image's map of an image query), ``alpha``
(overlay opacity, 0..1) and ``max_side`` (JSON only: shrink the heatmap so its longer side is at most this).
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from retrieval.errors import InvalidQueryError
from server.common import get_engine
from server.requests import AttributionRequest

bp = Blueprint("attribution", __name__)


@bp.post("/api/attribution")
def api_attribution():
    from retrieval.explain.attribution import explain
    from retrieval.explain.overlay import heatmap_json, overlay_png

    a = AttributionRequest.parse(request)
    fmt, side = a.format, a.side
    engine = get_engine()
    engine.locate(a.result_id)                       # 404 before embedding anything
    ctx = engine.embed(a.query)
    ex = explain(engine, ctx, a.result_id, method=a.attribution_method, rerank=a.query.rerank,
                 query_side=(side == "query"))
    if side == "query":
        if ex.query is None:
            raise InvalidQueryError("side=query needs an image query (image or image_id)")
        heat, image = ex.query, ex.query_image
    else:
        heat, image = ex.result, ex.result_image
    if fmt == "json":
        body = heatmap_json(heat, max_side=int(a.max_side) if a.max_side else None)
        body.update({"method": ex.method, "encoder": ex.encoder, "result_id": a.result_id, "side": side})
        if ex.extra:
            body["details"] = ex.extra
        return jsonify(body)
    resp = current_app.response_class(overlay_png(image, heat, alpha=a.alpha), mimetype="image/png")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Attribution-Method"] = ex.method
    return resp
