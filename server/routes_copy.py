"""Copy detection over HTTP: ``POST /api/duplicates``.

Body as in ``/api/search`` (JSON with a base64 ``image`` or an ``image_id``, or multipart with an
``image`` file) plus optional ``"threshold"`` (number), ``"k"`` (candidates, default 10),
``"normalize"`` / ``"verify"`` / ``"regions"`` (booleans; regions: also embed the query's content
boxes, on by default) and ``"encoder"``. Answer: ``{"matches": [{"id", "score", "similarity",
"region"?, ...}...], "encoder", "threshold", "took_ms"}``, best first; ``region`` is the
``[left, top, right, bottom]`` box of the query that matched when it was not the whole image.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from server.common import get_engine, parse_query
from server.errors import BadRequestError

bp = Blueprint("copy", __name__)
FEATURE = "duplicates"


def _number(name, value) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise BadRequestError(f"{name} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise BadRequestError(f"{name} must be a number")
    return float(value)


def _flag(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise BadRequestError(f"{name} must be true or false")


@bp.post("/api/duplicates")
def api_duplicates():
    from retrieval.copydetect.match import choose_encoder, match_images, verification_enabled
    from retrieval.copydetect.scores import MatchConfig

    t0 = time.perf_counter()
    q = parse_query(request, require_image=True)
    if q.text is not None or q.vector is not None:
        raise BadRequestError("/api/duplicates takes an image (upload, base64 or image_id), not text or vectors")
    extra = dict(q.extra)
    threshold = _number("threshold", extra.pop("threshold")) if extra.get("threshold") is not None else None
    if threshold is not None and not -2.0 <= threshold <= 3.0:
        raise BadRequestError("threshold must be in [-2, 3]")
    normalize = _flag("normalize", extra.pop("normalize")) if "normalize" in extra else True
    verify = _flag("verify", extra.pop("verify")) if "verify" in extra else None
    regions = _flag("regions", extra.pop("regions")) if "regions" in extra else True
    k = q.k if "k" in (request.get_json(silent=True) or request.form or {}) else 10
    engine = get_engine()
    image = q.image if q.image is not None else engine.load_image(q.image_id)
    config = MatchConfig(k=min(k, 100), threshold=threshold, normalize=normalize, verify=verify, regions=regions)
    name = choose_encoder(engine, q.encoder)
    found = match_images(engine, [image], config, encoder=name)[0]
    verified = verification_enabled(engine, name, config)
    return jsonify({
        "matches": [m.to_json() for m in found],
        "encoder": name,
        "threshold": config.resolved_threshold(verified, name),
        "took_ms": round((time.perf_counter() - t0) * 1e3, 2),
    })
