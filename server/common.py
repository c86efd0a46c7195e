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

    ``attribution_url`` (when the attribution feature is installed) is the endpoint to POST the same query
    plus ``"result_id"`` to (``/api/attribution``: a costly call, so POST only; ``query`` is not needed).
    With ``HIDE_PATHS`` the paths are relative to the indexed folder (``server.security.hide_paths``)."""
    out = engine.describe_hit(hit)
    if current_app.config.get("HIDE_PATHS"):
        from server.security import hide_paths

        hide_paths(engine, out)
    out["image_url"] = f"/api/images/{hit.id}"
    out["thumbnail_url"] = f"/api/images/{hit.id}?size=256"
    out["attribution_url"] = "/api/attribution" if "attribution" in features() else None
    return out
