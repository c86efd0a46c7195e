"""Collection-level routes of the web page: the collection's near-duplicates, page by page
(``GET /api/duplicates/groups?offset=0&limit=20``), and one image's description
(``GET /api/images/<id>/meta``: the result JSON of ``/api/search`` without a score).

The groups are ``loupe dedup``'s (:func:`retrieval.copydetect.collection.dedup_index` with its default
checks: candidates from the vectors, decided from the pixels), computed once per index version in a
background thread and kept on the engine (:meth:`retrieval.engine.Engine.cache`; a re-indexed
directory is a new engine, so a new computation). While it runs the endpoint answers 202
``{"status": "computing", "done", "total"}``; the page polls. Then 200::

    {"status": "ready", "total": G, "offset", "limit", "images", "seconds", "encoder",
     "groups": [{"keep": id, "remove": [id...], "members": [{"id", "path", "width", "height", "size",
                 "mtime", "keep", "thumbnail_url", "image_url"}...]}...],
     "exact": [{"id", "sources": [...]}...]}

``keep`` is :meth:`retrieval.copydetect.dedup.DedupResult.keeper` (the largest picture, then the
largest file, then the oldest), as ``loupe dedup --to-remove`` decides. A failed computation answers
500-free: 503 ``dedup_failed`` with the reason, and the next request tries again.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from retrieval.errors import LoupeError, UnknownIdError
from server.common import get_engine
from server.errors import BadRequestError

log = logging.getLogger("loupe.server")
bp = Blueprint("collection", __name__)

DEFAULT_LIMIT = 20
MAX_LIMIT = 200
CACHE_KEY = "server.collection-dedup"


class DedupFailedError(LoupeError, code="dedup_failed", status=503):
    """The collection's de-duplication failed (the reason is in the message); the next request retries."""


class _Cancelled(Exception):
    """The index version being de-duplicated was replaced: its groups would be stale."""


class CollectionDedup:
    """One index version's ``dedup_index`` result, computed once in a background thread; :meth:`cancel`
    (called when the server switches to a re-indexed version) stops it at its next progress step."""

    def __init__(self, engine):
        self.engine = engine
        self.cancelled = threading.Event()
        self.lock = threading.Lock()
        self.result = None
        self.error: str | None = None
        self.done = 0
        self.seconds: float | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        with self.lock:
            if self.result is not None or (self.thread is not None and self.thread.is_alive()):
                return
            self.error, self.done = None, 0
            self.thread = threading.Thread(target=self._run, name="loupe-collection-dedup", daemon=True)
            _RUNNING.add(self)
            self.thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    def _progress(self, n: int) -> None:
        if self.cancelled.is_set():
            raise _Cancelled
        self.done += int(n)

    def _run(self) -> None:
        from loupe.cli.cmd_dedup import _exact_candidate_rows
        from retrieval.copydetect.collection import CopyCheckConfig, dedup_index, describe_files

        t0 = time.perf_counter()
        try:
            rows = _exact_candidate_rows(self.engine.records.tables)
            result = dedup_index(self.engine, None, CopyCheckConfig(), metadata_rows=rows, progress=self._progress)
            describe_files(self.engine, result)
        except _Cancelled:
            log.info("stopped de-duplicating %s: the index was replaced", self.engine.index_dir)
            return
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 503, retried on the next request
            log.exception("de-duplicating %s failed", self.engine.index_dir)
            with self.lock:
                self.error = str(exc) or type(exc).__name__
            return
        with self.lock:
            self.seconds = time.perf_counter() - t0
            self.result = result


_RUNNING: "weakref.WeakSet[CollectionDedup]" = weakref.WeakSet()


@atexit.register
def stop_running_dedups(timeout: float = 10.0) -> None:
    """At exit: cancel every running de-duplication and wait for its thread (up to ``timeout`` s in all), so
    the process does not finalize while a daemon thread is inside faiss or torch (a crash at exit)."""
    jobs = list(_RUNNING)
    for job in jobs:
        job.cancel()
    deadline = time.monotonic() + timeout
    for job in jobs:
        thread = job.thread
        if thread is not None and thread.is_alive():
            thread.join(max(0.0, deadline - time.monotonic()))


def collection_dedup(engine) -> CollectionDedup:
    return engine.cache(CACHE_KEY, lambda: CollectionDedup(engine))


def cancel_collection_dedup(engine) -> None:
    """Stop ``engine``'s background de-duplication, if one runs (the server switched to a newer version)."""
    job = engine.cached(CACHE_KEY) if hasattr(engine, "cached") else None
    if job is not None:
        job.cancel()


def _int_arg(name: str, default: int, lo: int, hi: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequestError(f"{name} must be an integer in {lo}..{hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequestError(f"{name} must be an integer in {lo}..{hi}, got {value}")
    return value


def _member(engine, result, row: int, keep: int) -> dict[str, Any]:
    image_id = result.ids[row]
    f = dict(result.files.get(row) or {})
    out = {"id": image_id, "path": f.get("path"), "width": f.get("width"), "height": f.get("height"),
           "size": f.get("size"), "mtime": f.get("mtime"), "keep": row == keep,
           "thumbnail_url": f"/api/images/{image_id}?size=256", "image_url": f"/api/images/{image_id}"}
    if current_app.config.get("HIDE_PATHS"):
        from server.security import hide_paths

        hide_paths(engine, out)
    return out


@bp.get("/api/images/<image_id>/meta")
def api_image_meta(image_id: str):
    """One indexed image's result JSON (``{id, path, caption, metadata, image_url, ...}``, score 0): the page's
    result view for an image it has no search result for (a shared link, a copy match)."""
    from server.common import result_json
    from server.requests import ID

    if not ID.match(image_id):
        raise UnknownIdError(f"unknown image id {image_id!r}")
    engine = get_engine()
    out = result_json(engine, engine.hit_for_id(engine.default_encoder, image_id))
    out.pop("score", None)
    return jsonify(out)


@bp.get("/api/duplicates/groups")
def api_duplicate_groups():
    unknown = sorted(set(request.args) - {"offset", "limit"})
    if unknown:
        raise BadRequestError(f"unknown parameter {unknown[0]!r}; /api/duplicates/groups takes offset and limit")
    limit = _int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _int_arg("offset", 0, 0, 10**9)
    engine = get_engine()
    job = collection_dedup(engine)
    with job.lock:
        result, error = job.result, job.error
    if result is None:
        if error is not None and job.thread is not None and not job.thread.is_alive():
            job.thread = None            # the next request retries
            raise DedupFailedError(f"finding the collection's duplicates failed: {error}")
        job.start()
        return jsonify({"status": "computing", "done": job.done, "total": engine.count}), 202
    page = result.groups[offset:offset + limit]
    groups = []
    for g in page:
        keep = result.keeper(g)
        groups.append({"keep": result.ids[keep], "remove": [result.ids[r] for r in g if r != keep],
                       "members": [_member(engine, result, r, keep) for r in g]})
    summary = result.summary()
    exact = result.exact if offset == 0 else []
    if current_app.config.get("HIDE_PATHS"):
        from server.security import path_root, relative_path

        root = path_root(engine)
        exact = [{**e, "sources": [relative_path(s, root) for s in e.get("sources", [])]} for e in exact]
    return jsonify({"status": "ready", "total": len(result.groups), "offset": offset, "limit": limit,
                    "images": summary["images"], "images_in_groups": summary["images_in_groups"],
                    "encoder": summary.get("encoder"), "seconds": round(job.seconds or 0.0, 3),
                    "groups": groups, "exact": exact})
