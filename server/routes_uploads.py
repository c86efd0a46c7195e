"""``POST /api/uploads``: upload a query image once, get a token to send instead of the image.

Body: multipart with an ``image`` file, or JSON ``{"image": "<base64>"}`` — the same size limit
(``--max-upload-mb``), decode limits (``LOUPE_MAX_PIXELS``, ``LOUPE_MAX_DECODE_MB``) and decode slots as the
search endpoints, and the same 4xx JSON errors. Answer: ``{"upload": "<token>", "width", "height",
"expires_in"}`` (the picture's upright size in pixels — the frame of a search ``box`` — and the seconds the
token lives after its last use). ``/api/search``, ``/api/attribution``, ``/api/attribution/pair``,
``/api/duplicates`` and ``/api/classify`` then take ``"upload": "<token>"`` in place of ``image``
(:func:`server.requests.read_body` swaps it for the kept bytes). See :mod:`server.uploads`.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from retrieval.errors import InvalidQueryError
from server.errors import BadRequestError
from server.requests import read_body
from server.uploads import upload_cache

bp = Blueprint("uploads", __name__)

#: an upload is decoded (reduced, as the encoders would) only to check it is a picture within the limits
CHECK_SIDE = 256


@bp.post("/api/uploads")
def api_uploads():
    from retrieval.images import image_size, load_image

    fields, _ = read_body(request)
    extra = sorted(k for k in fields if k != "image")
    if extra:
        raise BadRequestError(f"unknown field {extra[0]!r}: /api/uploads takes one field, image (a file or base64)")
    data = fields.get("image")
    if not data:
        raise InvalidQueryError("missing image: upload an image file (multipart field image) or send it base64")
    load_image(data, min_side=CHECK_SIDE)            # a picture, within the pixel and decode limits
    width, height = image_size(data)
    cache = upload_cache()
    token = cache.put(data, width, height)
    return jsonify({"upload": token, "width": width, "height": height, "expires_in": int(cache.ttl)})
