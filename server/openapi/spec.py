"""The OpenAPI 3.0 document of the HTTP API: request bodies from the request dataclasses
(:mod:`server.openapi.schemas`), responses as the routes build them (:data:`RESPONSES`), one entry per route
of the app (:func:`build_spec`; a test checks that every route of ``create_app`` is described and that real
responses validate). OpenAPI 3.0 rather than 3.1: the vendored Swagger UI (``/docs``) renders 3.0.
"""

from __future__ import annotations

from typing import Any

from retrieval.engine.query import SCORE_KINDS
from retrieval.engine.request import SearchRequest
from server.openapi.schemas import ID_PATTERN, first_paragraph, request_schema
from server.requests import AttributionRequest, ClassifyRequest, DuplicatesRequest
from server.routes_collection import DEFAULT_LIMIT, MAX_LIMIT
from server.thumbnails import MAX_SIZE, MIN_SIZE

OPENAPI_VERSION = "3.0.3"


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Any], required: tuple[str, ...] = (), *, strict: bool = True, **extra: Any) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": not strict}
    if required:
        out["required"] = list(required)
    return {**out, **extra}


STR, NUM, INT, BOOL = {"type": "string"}, {"type": "number"}, {"type": "integer"}, {"type": "boolean"}
NULL_STR = {"type": "string", "nullable": True}
BOX = {"type": "array", "items": {"type": "integer"}, "minItems": 4, "maxItems": 4,
       "description": "[x0, y0, x1, y1] in pixels"}
HEATMAP = {"type": "array", "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}}}

#: what the routes answer (``jsonify`` bodies), by component name
RESPONSES: dict[str, dict[str, Any]] = {
    "Error": obj({"error": obj({"code": {**STR, "description": "machine-readable: bad_request, invalid_query, "
                                         "not_found, unsupported_media_type, busy, warming_up, index_format ..."},
                                "message": {**STR, "description": "what went wrong and what to do"}},
                               ("code", "message"))}, ("error",)),
    "Metadata": obj({"source": NULL_STR, "width": {**INT, "nullable": True}, "height": {**INT, "nullable": True},
                     "size": {**INT, "nullable": True}, "mtime": {**NUM, "nullable": True}, "sha256": NULL_STR,
                     "aliases": {"type": "array", "items": STR}}, strict=False,
                    description="the image's metadata columns and its manifest's other columns"),
    "Result": obj({
        "id": {**STR, "pattern": ID_PATTERN},
        "score": {**NUM, "description": "what it is says the response's score_kind"},
        "path": NULL_STR, "caption": NULL_STR, "metadata": ref("Metadata"),
        "image_url": STR, "thumbnail_url": STR,
        "attribution_url": {**NULL_STR, "description": "POST the same query plus result_id here (null: no "
                                                       "attribution feature)"},
        "box": {**BOX, "description": "where in this picture a region search found it"}},
        ("id", "score", "path", "caption", "metadata", "image_url", "thumbnail_url", "attribution_url")),
    "SearchResponse": obj({
        "results": {"type": "array", "items": ref("Result")},
        "offset": {**INT, "minimum": 0, "description": "rank of the first result (the request's offset)"},
        "took_ms": NUM, "encoder": {**STR, "description": "the encoder whose space answered"},
        "score_kind": {"type": "string", "enum": list(SCORE_KINDS), "description": (
            "what the results' scores are. cosine: the encoder's cosine similarity in [-1, 1]; fused_z: a "
            "weighted sum of z-scores over a pooled candidate list (instruction fusion, colour-aware text "
            "search) — unbounded, comparable only within one answer, not a similarity; reranked: the cosine "
            "plus local-feature evidence (rerank), may exceed 1; regions: the fused list of a region search "
            "(regions: true), a sum over the query's regions, may exceed 1")},
        "partial": {"type": "boolean", "description": "loupe serve --ray only: true when a partition of the "
                    "index did not answer (the results are exact for the partitions that did)"},
        "partitions": {"type": "object", "description": "loupe serve --ray only: which partitions answered",
                       "properties": {"answered": {"type": "array", "items": INT},
                                      "missing": {"type": "array", "items": INT}, "total": INT}},
        "timings": {"type": "object", "additionalProperties": NUM, "description": "milliseconds per stage"},
        "notes": {"type": "array", "items": STR, "description": "what the user should know about this answer"},
        "box": {**BOX, "description": "the query box searched (request box)"},
        "regions": {"type": "array", "items": obj({"box": BOX, "score": NUM, "kind": STR,
                                                   "results": {"type": "array", "items": ref("Result")}},
                                                  ("box", "results"))},
        "query_size": {"type": "array", "items": INT, "minItems": 2, "maxItems": 2,
                       "description": "[width, height] of the query picture"}},
        ("results", "took_ms", "encoder", "score_kind", "timings")),
    "Heatmap": obj({"width": INT, "height": INT, "heatmap": HEATMAP, "image_width": INT, "image_height": INT},
                   ("width", "height", "heatmap")),
    "Attribution": obj({
        "width": INT, "height": INT, "heatmap": HEATMAP, "image_width": INT, "image_height": INT,
        "method": STR, "label": STR, "encoder": STR, "result_id": STR, "note": STR,
        "side": {"type": "string", "enum": ["result", "query"]},
        "box": {"type": "array", "items": NUM, "nullable": True}, "details": {"type": "object"}},
        ("width", "height", "heatmap", "method", "label", "encoder", "result_id", "side")),
    "AttributionPair": obj({
        "method": STR, "label": STR, "encoder": STR, "result_id": STR, "note": STR,
        "result": ref("Heatmap"), "query": {"allOf": [ref("Heatmap")], "nullable": True},
        "lines": {"type": "array", "items": {}}, "details": {"type": "object"}},
        ("method", "label", "encoder", "result_id", "result", "query", "lines")),
    "Label": obj({"label": STR, "score": NUM}, ("label", "score")),
    "ClassifyResponse": obj({
        "labels": {"type": "array", "items": ref("Label")},
        "vocabulary": {"type": "string", "enum": ["captions", "imagenet21k"]}, "encoder": STR,
        "colours": {"type": "array", "items": obj({"colour": STR, "score": NUM}, ("colour", "score"))}},
        ("labels", "vocabulary", "encoder", "colours")),
    "Match": obj({"id": STR, "score": NUM, "similarity": NUM, "background": NUM, "verify": NUM,
                  "region": {"type": "array", "items": INT}, "check": {"type": "string", "enum": ["pdq", "aligned"]}},
                 ("id", "score", "similarity")),
    "DuplicatesResponse": obj({"matches": {"type": "array", "items": ref("Match")}, "encoder": STR,
                               "threshold": NUM, "took_ms": NUM}, ("matches", "encoder", "threshold", "took_ms")),
    "GroupMember": obj({"id": STR, "path": NULL_STR, "width": {**INT, "nullable": True},
                        "height": {**INT, "nullable": True}, "size": {**INT, "nullable": True},
                        "mtime": {**NUM, "nullable": True}, "keep": BOOL, "thumbnail_url": STR, "image_url": STR},
                       ("id", "keep")),
    "DuplicateGroups": obj({
        "status": {"type": "string", "enum": ["computing", "ready"]},
        "done": INT, "total": INT, "offset": INT, "limit": INT, "images": INT, "images_in_groups": INT,
        "encoder": NULL_STR, "seconds": NUM,
        "groups": {"type": "array", "items": obj({"keep": STR, "remove": {"type": "array", "items": STR},
                                                  "members": {"type": "array", "items": ref("GroupMember")}},
                                                 ("keep", "remove", "members"))},
        "exact": {"type": "array", "items": obj({"id": STR, "sources": {"type": "array", "items": STR}},
                                                ("id",), strict=False)}},
        ("status", "total")),
    "Health": obj({
        "status": {"type": "string", "enum": ["ok", "no_index"]}, "images": INT,
        "features": {"type": "array", "items": STR}, "encoders": {"type": "array", "items": STR},
        "text_encoder": NULL_STR, "default_encoder": STR, "shards": INT, "colour_encoder": NULL_STR,
        "classifier": {"type": "string", "enum": ["warming", "ready", "failed"]}},
        ("status", "images", "features")),
}
RESPONSES["Upload"] = obj({
    "upload": {**STR, "description": "the token: send it as upload in place of image (search, attribution, pair "
                                     "view, duplicates, classify)"},
    "width": {**INT, "description": "the picture's upright width in pixels (the frame of a search box)"},
    "height": {**INT, "description": "its upright height"},
    "expires_in": {**INT, "description": "seconds the token lives after its last use"}},
    ("upload", "width", "height", "expires_in"))
# the image's result JSON without a score (GET /api/images/<id>/meta)
RESPONSES["ImageMeta"] = obj({k: v for k, v in RESPONSES["Result"]["properties"].items() if k != "score"},
                             tuple(r for r in RESPONSES["Result"]["required"] if r != "score"))


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "invalid request (the message names the field)", 403: "forbidden Host",
             404: "unknown image id, or unknown / expired upload token (upload_not_found)",
             413: "upload too large", 415: "unsupported Content-Type", 503: "no index, busy, warming up or a "
             "damaged index (Retry-After when busy)"}
    return {str(c): _json(ref("Error"), words[c]) for c in codes}


def _body(name: str, *, form: bool = True) -> dict[str, Any]:
    content = {"application/json": {"schema": ref(name)}}
    if form:
        content["multipart/form-data"] = {"schema": ref(f"{name}Form")}
    return {"required": True, "content": content}


def _post(op_id: str, summary: str, body: str, ok: dict, *, tag: str, description: str = "",
          errors=(400, 404, 413, 415, 503)) -> dict[str, Any]:
    return {"post": {"operationId": op_id, "tags": [tag], "summary": summary, "description": description,
                     "requestBody": _body(body), "responses": {"200": ok, **_errors(*errors)}}}


def _get(op_id: str, summary: str, ok: dict, *, tag: str, params=(), errors=(), **more: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": op_id, "tags": [tag], "summary": summary,
                          "responses": {"200": ok, **more, **_errors(*errors)}}
    if params:
        op["parameters"] = list(params)
    return {"get": op}


def _param(name: str, where: str, schema: dict, description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": where, "required": required or where == "path", "schema": schema,
            "description": description}


IMAGE_ID = _param("image_id", "path", {"type": "string", "pattern": ID_PATTERN}, "an indexed image's id")
PNG = {"description": "a PNG overlay", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}


def paths() -> dict[str, Any]:
    """Every route of ``create_app``, by path."""
    attribution_json = {"description": "the overlay (format png) or the heatmap (format json)", "content": {
        "image/png": PNG["content"]["image/png"], "application/json": {"schema": ref("Attribution")}}}
    pair = {"description": "the pair view (format png) or both maps (format json)", "content": {
        "image/png": PNG["content"]["image/png"], "application/json": {"schema": ref("AttributionPair")}}}
    return {
        "/api/search": _post("search", "Search by text, image, indexed id or vector", "SearchRequest",
                             _json(ref("SearchResponse")), tag="search",
                             description=first_paragraph(SearchRequest) + " Unknown fields, and filters on a "
                             "field no image has, are a 400 naming them."),
        "/api/images/{image_id}": _get("image", "The indexed image, or a JPEG thumbnail", {
            "description": "the indexed bytes (JPEG, PNG, GIF, WebP, BMP) or a JPEG rendition",
            "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}, tag="images",
            params=(IMAGE_ID, _param("size", "query", {"type": "integer", "minimum": MIN_SIZE, "maximum": MAX_SIZE},
                                     "thumbnail: longer side in pixels")), errors=(400, 404)),
        "/api/images/{image_id}/meta": _get("image_meta", "An indexed image's result JSON (no score)",
                                            _json(ref("ImageMeta")), tag="images", params=(IMAGE_ID,), errors=(404,)),
        "/api/attribution": _post("attribution", "Why a result matched a query", "AttributionRequest",
                                  attribution_json, tag="attribution", description=first_paragraph(AttributionRequest)),
        "/api/attribution/pair": _post("attribution_pair", "Query and result side by side, matched regions linked",
                                       "AttributionRequest", pair, tag="attribution"),
        "/api/duplicates": _post("duplicates", "Is this image a copy of an indexed one?", "DuplicatesRequest",
                                 _json(ref("DuplicatesResponse")), tag="copy detection",
                                 description=first_paragraph(DuplicatesRequest)),
        "/api/duplicates/groups": _get(
            "duplicate_groups", "The collection's near-duplicate groups, page by page",
            _json(ref("DuplicateGroups"), "the groups (status ready)"), tag="copy detection",
            params=(_param("offset", "query", {"type": "integer", "minimum": 0, "default": 0}, "first group"),
                    _param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                              "default": DEFAULT_LIMIT}, "groups per page")),
            errors=(400, 503), **{"202": _json(ref("DuplicateGroups"), "still computing (status computing)")}),
        "/api/classify": _post("classify", "Labels for an image without a fixed label list", "ClassifyRequest",
                               _json(ref("ClassifyResponse")), tag="classify",
                               description=first_paragraph(ClassifyRequest)),
        "/api/uploads": {"post": {
            "operationId": "upload", "tags": ["search"], "summary": "Upload a query image once; get a token for it",
            "description": "The token stands for the image in later requests (field upload), for "
                           "LOUPE_UPLOAD_TTL seconds after its last use; an unknown or expired token is a 404 "
                           "upload_not_found. The server keeps a bounded number of uploads (LOUPE_UPLOADS, "
                           "LOUPE_UPLOADS_MB), least recently used first out.",
            "requestBody": {"required": True, "content": {
                "multipart/form-data": {"schema": obj({"image": {"type": "string", "format": "binary"}}, ("image",))},
                "application/json": {"schema": obj({"image": {"type": "string", "format": "byte"}}, ("image",))}}},
            "responses": {"200": _json(ref("Upload")), **_errors(400, 413, 415, 503)}}},
        "/healthz": _get("healthz", "Liveness and what the index holds", _json(ref("Health")), tag="service",
                         **{"503": _json(ref("Health"), "no index loaded")}),
        "/metrics": _get("metrics", "Prometheus metrics", {"description": "Prometheus text exposition format",
                         "content": {"text/plain": {"schema": STR}}}, tag="service"),
        "/": _get("page", "The web page (state in the URL: /?q=...)", {
            "description": "HTML", "content": {"text/html": {"schema": STR}}}, tag="service"),
        "/openapi.json": _get("openapi", "This document", _json({"type": "object"}), tag="service"),
        "/docs": _get("docs", "This document, rendered (Swagger UI, served from this server)", {
            "description": "HTML", "content": {"text/html": {"schema": STR}}}, tag="service"),
    }


def build_spec(version: str = "0") -> dict[str, Any]:
    """The OpenAPI document (a fresh dict: callers may change it)."""
    schemas = dict(RESPONSES)
    requests = {"SearchRequest": (SearchRequest,), "AttributionRequest": (SearchRequest, AttributionRequest),
                "DuplicatesRequest": (DuplicatesRequest,), "ClassifyRequest": (ClassifyRequest,)}
    for name, classes in requests.items():
        schemas[name] = request_schema(*classes, description=first_paragraph(classes[-1]))
        schemas[f"{name}Form"] = request_schema(*classes, form=True, description=(
            "the same fields as a multipart form: the image as a file, other values as text (filter, vector, "
            "params as JSON); repeated text fields are weighted terms"))
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "Loupe", "version": version,
                 "description": "Image retrieval over one index: search, images, attribution, copy detection, "
                                "classification. Errors are {\"error\": {\"code\", \"message\"}} with a 4xx or "
                                "503 status; request bodies are strict (an unknown field is a 400)."},
        "paths": paths(),
        "components": {"schemas": schemas},
    }
