"""Copy detection over HTTP: ``POST /api/duplicates``.

Body as in ``/api/search`` (JSON with a base64 ``image`` or an ``image_id``, or multipart with an
``image`` file) plus optional ``"threshold"`` (number), ``"k"`` (candidates, default 10),
``"normalize"`` / ``"verify"`` / ``"regions"`` (booleans; regions: also embed the query's content
boxes, on by default) and ``"encoder"``. Answer: ``{"matches": [{"id", "score", "similarity",
"region"?, ...}...], "encoder", "threshold", "took_ms"}``, best first; ``region`` is the
``[left, top, right, bottom]`` box of the query that matched when it was not the whole image.

Without a ``"threshold"``, the default behaviour is ``loupe dedup``'s: the top candidates whose raw
similarity reaches the encoder's loose candidate threshold are also compared with the query from
pixels (PDQ hashes, aligned thumbnails: ``retrieval.copydetect.collection``), so a resized or
re-encoded copy is found even where a general-purpose encoder scores it like a look-alike; such a
match carries ``"check": "pdq" | "aligned"``.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify, request

from server.common import get_engine
from server.requests import DuplicatesRequest

bp = Blueprint("copy", __name__)
FEATURE = "duplicates"


@bp.post("/api/duplicates")
def api_duplicates():
    from retrieval.copydetect.match import choose_encoder, match_images, verification_enabled
    from retrieval.copydetect.scores import MatchConfig

    t0 = time.perf_counter()
    q = DuplicatesRequest.parse(request)
    engine = get_engine()
    image = q.image if q.image is not None else engine.load_image(q.image_id)
    config = MatchConfig(k=q.k, threshold=q.threshold, normalize=q.normalize, verify=q.verify, regions=q.regions)
    name = choose_encoder(engine, q.encoder)
    found = match_images(engine, [image], config, encoder=name)[0]
    verified = verification_enabled(engine, name, config)
    return jsonify({
        "matches": [m.to_json() for m in found],
        "encoder": name,
        "threshold": config.resolved_threshold(verified, name),
        "took_ms": round((time.perf_counter() - t0) * 1e3, 2),
    })
