"""Server errors and their JSON form: ``{"error": {"code": "...", "message": "..."}}`` with a 4xx status.

Library ``LoupeError``s keep their ``code``/``http_status``; invalid input raises ``BadRequestError``
(400); HTTP errors become JSON; anything unexpected is a JSON 500 with no traceback (logged).
Messages never carry a server path: an absolute path in a library message is cut to its last name
(``…/shard-00000.faiss``) before it reaches the client; the full message is logged. Input nested so
deeply that parsing it recurses too far is a 400 ``invalid_json``.
"""

from __future__ import annotations

import logging
import re

from flask import current_app, jsonify
from flask import request as flask_request
from werkzeug.exceptions import HTTPException

from retrieval.errors import LoupeError

log = logging.getLogger("loupe.server")


class BadRequestError(LoupeError, code="bad_request", status=400):
    pass


class InvalidJsonError(BadRequestError, code="invalid_json"):
    pass


class NoIndexError(LoupeError, code="no_index", status=503):
    pass


class UnsupportedMediaTypeError(LoupeError, code="unsupported_media_type", status=415):
    pass


class ForbiddenHostError(LoupeError, code="forbidden_host", status=403):
    pass


class ServerBusyError(LoupeError, code="busy", status=503):
    """Every decode slot is taken (``LOUPE_MAX_DECODES``): try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


# an absolute path: "/" after a space, quote or bracket, then at least one more "/"-separated part
_ABS_PATH = re.compile(r"""(?<![\w/.:~-])/(?:[^\s/'"()\[\],;]+/)+([^\s/'"()\[\],;]*)""")
_ROUTE_PREFIXES = ("/api/", "/static/", "/healthz", "/metrics", "/docs", "/openapi.json")


def scrub_paths(message: str) -> str:
    """``message`` with every absolute filesystem path cut to ``…/LAST_NAME`` (API routes are kept)."""
    def _cut(m: re.Match) -> str:
        text = m.group(0)
        return text if text.startswith(_ROUTE_PREFIXES) else f"…/{m.group(1)}"

    return _ABS_PATH.sub(_cut, message)


def error_response(code: str, message: str, status: int = 400):
    """A JSON error response ``{"error": {"code", "message"}}``."""
    resp = jsonify({"error": {"code": code, "message": message}})
    resp.status_code = status
    return resp


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 408: "request_timeout", 409: "conflict",
               413: "payload_too_large", 415: "unsupported_media_type", 429: "too_many_requests"}


def register_error_handlers(app) -> None:
    """LoupeError → its 4xx JSON; HTTP errors → JSON; anything else → JSON 500 without traceback."""

    @app.errorhandler(LoupeError)
    def _loupe_error(exc: LoupeError):
        status = int(getattr(exc, "http_status", 400) or 400)
        message = str(exc) or exc.__class__.__name__
        if status == 503:       # expected and temporary (e.g. warming up): not an error to page anyone for
            log.info("unavailable for now: %s", message)
        elif status >= 500:
            log.error("server-side error: %s", message)
        public = scrub_paths(message)
        if public != message and status < 500:
            log.info("%s %s: %s", flask_request.method, flask_request.path, message)   # the paths, for the operator
        resp = error_response(getattr(exc, "code", "loupe_error"), public, status)
        if getattr(exc, "retry_after", None):
            resp.headers["Retry-After"] = str(int(exc.retry_after))
        return resp

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            limit = int(current_app.config["MAX_UPLOAD_BYTES"])
            message = f"request too large: uploads are limited to {limit // (1024 * 1024)} MB"
        resp = error_response(_HTTP_CODES.get(status, exc.name.lower().replace(" ", "_")), message, status)
        if status == 405 and getattr(exc, "valid_methods", None):
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):
            return _http_error(exc)
        if isinstance(exc, RecursionError):     # e.g. a JSON filter nested 100,000 deep in a form field
            log.warning("%s %s: input nested too deeply (%s)", flask_request.method, flask_request.path, exc)
            return error_response(InvalidJsonError.code, "the request is nested too deeply", 400)
        log.exception("unhandled error on %s %s", flask_request.method, flask_request.path)
        return error_response("internal_error", "internal server error (details are in the server log)", 500)
