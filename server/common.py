"""What every blueprint shares: the app's state (engine, metrics, thumbnails) and a result's JSON shape.

Requests are parsed in :mod:`server.requests`, errors rendered in :mod:`server.errors`.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import current_app

from server.errors import NoIndexError

log = logging.getLogger("loupe.server")

MAX_UPLOAD_BYTES = 20 * 1024 * 1024          # one uploaded image
EXT_KEY = "loupe"


# -- app state -------------------------------------------------------------------------------------
def state(app=None) -> dict[str, Any]:
    return (app or current_app).extensions[EXT_KEY]


def get_engine():
    """The app's ``retrieval.engine.Engine`` (opened once, shared by all requests)."""
    engine = state().get("engine")
    if engine is None:
        raise NoIndexError("no index is loaded; start the server with `loupe serve DIR`")
    return engine


def features() -> list[str]:
    return list(state().get("features", []))


def result_json(engine, hit, query=None) -> dict[str, Any]:
    """One search result as the API returns it (adds ``image_url``, ``thumbnail_url``, ``attribution_url``).

    ``attribution_url`` (when the attribution feature is installed) is a GET URL that carries the
    query for text / image_id queries; for uploaded images, POST the same query + ``result_id`` to it."""
    from urllib.parse import urlencode

    out = engine.describe_hit(hit)
    out["image_url"] = f"/api/images/{hit.id}"
    out["thumbnail_url"] = f"/api/images/{hit.id}?size=256"
    if "attribution" in features():
        args: dict[str, Any] = {"result_id": hit.id}
        if query is not None and query.image is None:
            for key in ("text", "image_id", "instruction", "encoder"):
                value = getattr(query, key)
                if isinstance(value, str):
                    args[key] = value
        out["attribution_url"] = "/api/attribution?" + urlencode(args)
    else:
        out["attribution_url"] = None
    return out
