"""``POST /api/attribution``: why a result matched a query, as a PNG overlay or heatmap JSON;
``POST /api/attribution/pair``: the pair view (query and result side by side with their maps and the
locally matched regions linked by lines, plus a legend) as one PNG — what the page shows under "Why?".

Fields: the search query fields (``text`` / ``image`` / ``image_id`` / ``instruction`` / ``encoder`` /
``rerank``) plus ``result_id`` (required), and optionally ``format`` (``"png"`` default, or
``"json"`` → ``{"width", "height", "heatmap": [[...]], "method", "label", "encoder", "result_id", "box"}``
plus ``"note"`` when the map is approximate and ``"details"`` for matched regions),
``attribution_method`` (``auto|tokens|gradcam|cam|gradinput|integrated|integrated-raw|eigencam|occlusion|
matches|colour``), ``side`` (``result`` default, or ``query`` for the query image's map of an image query),
``alpha`` (overlay opacity, 0..1) and ``max_side`` (JSON only: shrink the heatmap so its longer side is at
most this). The PNG overlay keeps the image's size (the page lays it over the thumbnail): the top 20 %
outlined, the part the encoder did not see hatched; its headers ``X-Attribution-Method``,
``X-Attribution-Label``, ``X-Attribution-Encoder`` and, for approximate maps, ``X-Attribution-Note`` (also
sent as ``X-Loupe-Note``) carry the legend's words. The pair view answers ``format=json`` with both maps
(``max_side`` applies) and the match lines.

A query with a ``box`` is explained on the box's crop, as ``/api/search`` searched it (``box_request``).
The query is embedded exactly as ``/api/search`` embeds it (``Engine.embed`` on the same request fields), so a
map explains the encoder that ranked the result: the page's image search without an ``encoder`` field goes to
the index's default encoder (its text encoder, e.g. ``conse-effnet-lite0``), and an image query is explained
through that encoder's image path (``default_method(..., image_query=True)``: integrated gradients for the
EfficientNet-based encoders), never with the text query's method.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from retrieval.errors import InvalidQueryError
from server.common import get_engine
from server.requests import AttributionRequest

bp = Blueprint("attribution", __name__)


def _explain(a, *, pair: bool):
    from retrieval.explain.attribution import explain

    engine = get_engine()
    engine.locate(a.result_id)                       # 404 before embedding anything
    query = a.query
    if query.box is not None:                        # a box query is explained as the search ran it: the crop
        from retrieval.regions.search import box_request

        query, _ = box_request(engine, query)
    ctx = engine.embed(query)
    return explain(engine, ctx, a.result_id, method=a.attribution_method, rerank=a.query.rerank,
                   query_side=(a.side == "query"), pair=pair)


def _png(data: bytes, ex):
    resp = current_app.response_class(data, mimetype="image/png")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Attribution-Method"] = ex.method
    resp.headers["X-Attribution-Label"] = ex.label
    resp.headers["X-Attribution-Encoder"] = ex.encoder
    if ex.note:
        resp.headers["X-Attribution-Note"] = ex.note
        resp.headers["X-Loupe-Note"] = ex.note
    return resp


def _about(ex, a) -> dict:
    out = {"method": ex.method, "label": ex.label, "encoder": ex.encoder, "result_id": a.result_id}
    if ex.note:
        out["note"] = ex.note
    return out


@bp.post("/api/attribution")
def api_attribution():
    from retrieval.explain.overlay import heatmap_json, overlay_png

    a = AttributionRequest.parse(request)
    ex = _explain(a, pair=False)
    if a.side == "query":
        if ex.query is None:
            raise InvalidQueryError("side=query needs an image query (image or image_id)")
        heat, image, box = ex.query, ex.query_image, ex.query_box
    else:
        heat, image, box = ex.result, ex.result_image, ex.result_box
    if a.format == "json":
        body = heatmap_json(heat, max_side=int(a.max_side) if a.max_side else None)
        body.update(_about(ex, a), side=a.side, box=[round(float(v), 1) for v in box] if box else None)
        if ex.extra:
            body["details"] = ex.extra
        return jsonify(body)
    return _png(overlay_png(image, heat, alpha=a.alpha, box=box), ex)


@bp.post("/api/attribution/pair")
def api_attribution_pair():
    from retrieval.explain.overlay import heatmap_json
    from retrieval.explain.pair import pair_png

    a = AttributionRequest.parse(request)
    ex = _explain(a, pair=True)
    if a.format == "json":
        side = int(a.max_side) if a.max_side else None
        body = {**_about(ex, a), "result": heatmap_json(ex.result, max_side=side),
                "query": heatmap_json(ex.query, max_side=side) if ex.query is not None else None,
                "lines": ex.extra.get("lines", []), "details": {k: v for k, v in ex.extra.items() if k != "lines"}}
        return jsonify(body)
    return _png(pair_png(ex, alpha=a.alpha), ex)
