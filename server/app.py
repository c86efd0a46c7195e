"""The Flask app factory.

>>> app = create_app({"INDEX_DIR": "~/loupe-index"})        # opens the index (read-only)
>>> app = create_app(engine=my_engine)                      # or share an Engine (tests, embedding)

Config keys: ``INDEX_DIR``, ``DEVICE`` (auto|cpu|cuda), ``MAX_UPLOAD_BYTES`` (20 MB: one image),
``THUMBNAIL_CACHE_BYTES`` (64 MB), ``PRELOAD_ENCODERS`` (load the default encoders at start-up),
``WARM_CLASSIFIER`` (open — the first time build and cache on disk — the vocabulary-free classifier's
text database in a background thread at start-up; until it is ready ``/api/classify`` and the caption
route of instruction queries answer 503 ``warming_up``; ``loupe serve`` turns it on),
``RELOAD_INTERVAL`` (5 s: a request at most this often checks whether ``loupe index`` replaced the
manifest, and then the index is reopened — loaded models are kept — so serving and indexing can run
side by side; classifiers over the index's captions are then rebuilt in the background). A new version
that fails the checks of opening (``IndexFormatError``: sizes, dimensions, counts, norms — see
``retrieval.index.store``) is logged once and not switched to: the previous engine keeps serving. A
damaged index met while answering is a 503 ``index_format`` JSON error and an error log line, never a 500.
Blueprints come from ``server.routes_search`` (search, images, the web page) and
``server.routes_attribution`` / ``server.routes_copy`` / ``server.routes_classify`` /
``server.routes_collection`` (the collection's duplicate groups) / ``server.routes_uploads`` (a query
picture uploaded once, then named by a token: ``server.uploads``); each adds
its feature name to ``GET /healthz``'s ``features``.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request

from retrieval.errors import IndexFormatError
from server.common import EXT_KEY, MAX_UPLOAD_BYTES, state
from server.errors import error_response, register_error_handlers, scrub_paths
from server.metrics import CONTENT_TYPE_LATEST, Metrics
from server.routes_collection import cancel_collection_dedup
from server.security import apply_path_views
from server.security import install as install_security
from server.thumbnails import ThumbnailCache

log = logging.getLogger("loupe.server")

# module -> feature name reported by /healthz
BLUEPRINTS = {
    "server.routes_search": "search",
    "server.routes_attribution": "attribution",
    "server.routes_copy": "duplicates",
    "server.routes_classify": "classify",
    "server.routes_collection": "duplicate-groups",
    "server.routes_uploads": "uploads",    # POST /api/uploads: a query image once, then its token
    "server.openapi": "openapi",          # GET /openapi.json, GET /docs
}

DEFAULTS: dict[str, Any] = {
    "INDEX_DIR": None,
    "DEVICE": "auto",
    "MAX_UPLOAD_BYTES": MAX_UPLOAD_BYTES,
    "THUMBNAIL_CACHE_BYTES": 64 * 1024 * 1024,
    "PRELOAD_ENCODERS": False,
    "WARM_CLASSIFIER": False,
    "RELOAD_INTERVAL": 5.0,      # seconds between checks for a re-indexed DIR (0: never reload)
    "JSON_SORT_KEYS": False,
    "ALLOWED_HOSTS": None,       # Host names served (None: any; `loupe serve` sets them) - server.security
    "HIDE_PATHS": False,         # results' paths relative to the indexed folder - server.security
}


def _register_blueprints(app: Flask) -> list[str]:
    """Register every feature's blueprint; returns the feature names ``/healthz`` reports."""
    for module_name in BLUEPRINTS:
        app.register_blueprint(importlib.import_module(module_name).bp)
    return list(BLUEPRINTS.values())


def create_app(config: dict[str, Any] | None = None, *, engine=None) -> Flask:
    """Build the app. ``engine`` (a ``retrieval.engine.Engine``) or ``config["INDEX_DIR"]`` gives the index."""
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.update(DEFAULTS)
    app.config.update(config or {})
    limit = int(app.config["MAX_UPLOAD_BYTES"])
    # a base64 image in JSON is 4/3 of its bytes, plus the other fields
    app.config["MAX_CONTENT_LENGTH"] = limit * 4 // 3 + 1024 * 1024
    app.json.sort_keys = False

    if engine is None and app.config.get("INDEX_DIR"):
        from retrieval.engine.engine import Engine

        engine = Engine(app.config["INDEX_DIR"], device=app.config.get("DEVICE", "auto"))
    metrics = Metrics()
    metrics.set_index(engine)
    app.extensions[EXT_KEY] = {"engine": engine, "metrics": metrics, "features": [],
                               "thumbnails": ThumbnailCache(app.config["THUMBNAIL_CACHE_BYTES"])}
    register_error_handlers(app)

    @app.errorhandler(IndexFormatError)
    def _index_error(exc: IndexFormatError):
        """A damaged index: 503 (nothing the client can fix) and an error line for the operator."""
        log.error("index damaged: %s", exc)
        return error_response(exc.code, scrub_paths(str(exc)), exc.http_status)

    install_security(app)
    apply_path_views(app, engine)       # --hide-paths: filters take the paths as results show them
    features = _register_blueprints(app)
    if engine is not None:
        features += ["text"] if engine.text_encoder else []
        features.append("rerank")
    state(app)["features"] = features
    if engine is not None and app.config.get("PRELOAD_ENCODERS"):
        for name in {engine.default_encoder, engine.text_encoder} - {None}:
            engine.encoder(name)
    if engine is not None and engine.text_encoder and app.config.get("WARM_CLASSIFIER"):
        from retrieval.classify.registry import classifiers_of

        classifiers = classifiers_of(engine)
        classifiers.warm_classifier(engine.encoder(engine.text_encoder), classifiers.default_source(engine.index_dir))

    reload_state = {"next": time.monotonic() + float(app.config.get("RELOAD_INTERVAL") or 0), "lock": threading.Lock(),
                    "rejected": None}   # the manifest version (mtime, inode, size) that failed to open

    def _maybe_reload() -> None:
        """Pick up a new indexing run: reopen the index when its manifest was replaced."""
        interval = float(app.config.get("RELOAD_INTERVAL") or 0)
        if interval <= 0 or time.monotonic() < reload_state["next"]:
            return
        if not reload_state["lock"].acquire(blocking=False):
            return                      # another request is checking / reloading
        try:
            reload_state["next"] = time.monotonic() + interval
            eng = state(app).get("engine")
            if eng is None or not hasattr(eng, "changed_on_disk") or not eng.changed_on_disk():
                return
            version = _manifest_version(eng)
            if version is not None and version == reload_state["rejected"]:
                return                  # this version was already found damaged; wait for the next one
            try:
                new = eng.reopen()
            except IndexFormatError as exc:     # damaged: rejected before the switch, logged once per version
                reload_state["rejected"] = version
                log.error("index %s changed but the new version is damaged (%s); still serving the previous "
                          "state", eng.index_dir, exc)
                return
            except Exception:  # noqa: BLE001 - keep serving the old view if the new one is unreadable
                log.exception("index %s changed but could not be reopened; still serving the previous state",
                              eng.index_dir)
                return
            _refresh_classifiers(eng, new)     # before `new` serves: it takes over `eng`'s classifiers
            apply_path_views(app, new)
            state(app)["engine"] = new
            cancel_collection_dedup(eng)        # the old version's duplicate groups would be stale
            metrics.set_index(new)
            log.info("reloaded %s: %d images", new.index_dir, new.count)
        finally:
            reload_state["lock"].release()

    def _manifest_version(eng):
        from retrieval.index.store import MANIFEST

        try:
            st = (eng.index_dir / MANIFEST).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def _refresh_classifiers(old, new) -> None:
        """On a reload: the reopened engine takes over the previous one's classifier registry; rebuild
        (in the background; the previous one answers meanwhile) the classifiers over the index's captions,
        and warm the default text database, which may now be the captions (an index that reached
        ``MIN_INDEX_CAPTIONS``)."""
        try:
            from retrieval.classify.registry import share_classifiers
        except ImportError:
            return
        try:
            classifiers = share_classifiers(old, new)
            classifiers.refresh_classifiers(str(new.index_dir))
            if new.text_encoder and app.config.get("WARM_CLASSIFIER"):
                classifiers.warm_classifier(new.encoder(new.text_encoder), classifiers.default_source(new.index_dir))
        except Exception:  # noqa: BLE001 - the next classify request rebuilds what is stale
            log.exception("could not refresh the classifiers of %s after the reload", new.index_dir)

    @app.before_request
    def _start_timer():
        g.loupe_t0 = time.perf_counter()
        metrics.in_flight.inc()
        _maybe_reload()

    @app.after_request
    def _record(resp: Response):
        t0 = g.pop("loupe_t0", None)
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        if t0 is not None:
            metrics.in_flight.dec()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        metrics.count_request(request.method, endpoint, resp.status_code)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        return resp

    @app.get("/healthz")
    def healthz():
        eng = state().get("engine")
        body: dict[str, Any] = {"status": "ok" if eng is not None else "no_index",
                                "images": eng.count if eng is not None else 0,
                                "features": state()["features"]}
        if eng is not None:
            from retrieval.compose.fusion import colour_encoder

            body.update({"encoders": eng.encoder_names, "text_encoder": eng.text_encoder,
                         "default_encoder": eng.default_encoder, "shards": len(eng.shard_names),
                         "colour_encoder": colour_encoder(eng)})
            if app.config.get("WARM_CLASSIFIER") and eng.text_encoder:
                from retrieval.classify.registry import classifiers_of

                body["classifier"] = classifiers_of(eng).warm_status()    # warming | ready | failed
        return jsonify(body), (200 if eng is not None else 503)

    @app.get("/metrics")
    def metrics_view():
        thumbs = state()["thumbnails"]
        metrics.thumb_cache.set(thumbs.bytes)
        if state().get("uploads") is not None:
            metrics.set_uploads(*state()["uploads"].stats())
        return Response(metrics.render(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                        headers={"Content-Type": CONTENT_TYPE_LATEST})

    return app
