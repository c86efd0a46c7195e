"""Helpers every blueprint uses: the engine, query parsing/validation, JSON errors.

>>> from server.common import get_engine, parse_query, error_response
>>> q = parse_query(request)                 # JSON or multipart -> QueryPayload (validated)
>>> resp = get_engine().search(**q.search_kwargs())

Errors are ``{"error": {"code": "...", "message": "..."}}`` with a 4xx status: library
``LoupeError``s keep their ``code``/``http_status``; invalid input raises ``BadRequestError``
(400). Uploads are limited to ``MAX_UPLOAD_BYTES`` (20 MB, config ``MAX_UPLOAD_BYTES``); larger bodies
get 413. The server never fetches URLs on a client's behalf.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from flask import request as flask_request

from retrieval.errors import ImageTooLargeError, InvalidImageError, InvalidQueryError
from server.errors import BadRequestError, InvalidJsonError, NoIndexError

log = logging.getLogger("loupe.server")

MAX_UPLOAD_BYTES = 20 * 1024 * 1024          # one uploaded image
MAX_K = 1000
DEFAULT_K = 20
EXT_KEY = "loupe"


@dataclass
class QueryPayload:
    """A validated query, from JSON or multipart. ``extra`` holds every other field (e.g.
    ``result_id``, ``threshold``, ``format``) for the blueprint to validate itself."""

    text: str | list[str] | None = None
    image: bytes | None = None
    image_id: str | None = None
    vector: list[float] | None = None
    instruction: str | None = None
    k: int = DEFAULT_K
    rerank: bool = False
    filter: dict[str, Any] | None = None
    encoder: str | None = None
    dedup: bool | float = False
    weight: float | None = None
    method: str | None = None
    colour: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def has_query(self) -> bool:
        return any(v is not None for v in (self.text, self.image, self.image_id, self.vector))

    def query_kwargs(self) -> dict[str, Any]:
        """Arguments for ``Engine.embed``."""
        out: dict[str, Any] = {"text": self.text, "image": self.image, "image_id": self.image_id,
                               "vector": self.vector, "instruction": self.instruction, "encoder": self.encoder,
                               "weight": self.weight}
        if self.method:
            out["method"] = self.method
        return out

    def search_kwargs(self) -> dict[str, Any]:
        """Arguments for ``Engine.search``."""
        return {**self.query_kwargs(), "k": self.k, "rerank": self.rerank, "filter": self.filter,
                "dedup": self.dedup, "colour": self.colour}


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


# -- parsing ---------------------------------------------------------------------------------------
def _bad(message: str) -> BadRequestError:
    return BadRequestError(message)


def decode_base64_image(value: str, limit: int) -> bytes:
    """Base64 (optionally a ``data:image/...;base64,`` URL) → bytes, within ``limit``."""
    if value.startswith(("http://", "https://", "ftp://", "file:")):
        raise BadRequestError("image must be base64 data or an upload; this server does not fetch URLs")
    if value.startswith("data:"):
        head, _, value = value.partition(",")
        if ";base64" not in head:
            raise InvalidImageError("image data URL must be base64-encoded")
    compact = "".join(value.split())
    if len(compact) * 3 // 4 > limit + 3:
        raise ImageTooLargeError(f"image is over the upload limit of {limit // (1024 * 1024)} MB")
    try:
        if "-" in compact or "_" in compact:
            compact = compact.replace("-", "+").replace("_", "/")
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError("image is not valid base64") from exc
    if not data:
        raise InvalidImageError("image is empty")
    if len(data) > limit:
        raise ImageTooLargeError(f"image is over the upload limit of {limit // (1024 * 1024)} MB")
    return data


def _as_bool(name: str, value: Any, form: bool) -> bool:
    if isinstance(value, bool):
        return value
    if form and isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no",
                                                                     "off", ""):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise _bad(f"{name} must be true or false")


def _as_int(name: str, value: Any, form: bool) -> int:
    if form and isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _bad(f"{name} must be an integer") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{name} must be an integer")
    return value


def _as_float(name: str, value: Any, form: bool) -> float:
    if form and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise _bad(f"{name} must be a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise _bad(f"{name} must be a number")
    return float(value)


def _as_str(name: str, value: Any, max_len: int = 1000) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if len(value) > max_len:
        raise _bad(f"{name} is too long (max {max_len} characters)")
    return value


def read_fields(request=None) -> tuple[dict[str, Any], bytes | None, bool]:
    """The request's fields (JSON object or form), the uploaded ``image`` file's bytes, and whether
    it was a form. Raises ``BadRequestError`` for invalid JSON / non-object bodies."""
    request = request or flask_request
    limit = int(current_app.config.get("MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES))
    mimetype = (request.mimetype or "").lower()
    if mimetype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        fields: dict[str, Any] = {k: v for k, v in request.form.items()}
        texts = [t for t in request.form.getlist("text") if t.strip()]
        if len(texts) > 1:
            fields["text"] = texts          # repeated text fields = weighted terms
        upload = None
        files = request.files.getlist("image")
        if len(files) > 1:
            raise _bad("upload one image per query")
        if files:
            data = files[0].read(limit + 1)
            if len(data) > limit:
                raise ImageTooLargeError(f"image is over the upload limit of {limit // (1024 * 1024)} MB")
            if not data:
                raise InvalidImageError("the uploaded image file is empty")
            upload = data
        return fields, upload, True
    raw = request.get_data(cache=True)
    if not raw.strip():
        if request.method == "GET":
            return dict(request.args.items()), None, True
        raise InvalidJsonError("empty request body: send a JSON object (Content-Type: application/json) "
                               "or a multipart form")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJsonError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidJsonError("request body must be a JSON object")
    return body, None, False


def parse_query(request=None, *, require_query: bool = True, require_image: bool = False) -> QueryPayload:
    """Validate a query request (JSON or multipart) into a ``QueryPayload``.

    Known fields are type-checked (``k`` in 1..1000, ``rerank`` boolean, ``filter`` object, ...);
    unknown fields land in ``payload.extra``. ``require_query``: one of text/image/image_id/vector
    must be present; ``require_image``: an image (upload/base64) or image_id must be present."""
    request = request or flask_request
    fields, upload, form = read_fields(request)
    limit = int(current_app.config.get("MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES))
    p = QueryPayload()
    for key, value in fields.items():
        if form and isinstance(value, str) and value.strip() == "" and key != "image":
            continue   # blank form fields mean "not given"
        if value is None:
            continue
        if key == "text":
            if isinstance(value, list):
                if not value or not all(isinstance(t, str) for t in value):
                    raise _bad("text must be a string or a list of strings")
                p.text = [_as_str("text", t) for t in value]
            else:
                text = _as_str("text", value)
                p.text = text if text.strip() else None
        elif key == "image":
            if isinstance(value, str) and value.strip():
                p.image = decode_base64_image(value.strip(), limit)
            elif not (isinstance(value, str) and form):
                raise _bad("image must be a base64 string (JSON) or a file upload (multipart)")
        elif key in ("image_url", "url"):
            raise BadRequestError("this server does not fetch URLs; upload the image or send it as base64")
        elif key == "image_id":
            p.image_id = _as_str("image_id", value, 64).strip()
        elif key == "instruction":
            text = _as_str("instruction", value)
            p.instruction = text if text.strip() else None
        elif key == "k":
            p.k = _as_int("k", value, form)
            if not 1 <= p.k <= MAX_K:
                raise InvalidQueryError(f"k must be in 1..{MAX_K}, got {p.k}")
        elif key == "rerank":
            p.rerank = _as_bool("rerank", value, form)
        elif key == "colour":
            p.colour = _as_bool("colour", value, form)
        elif key == "dedup":
            if isinstance(value, bool) or (form and isinstance(value, str) and not _looks_number(value)):
                p.dedup = _as_bool("dedup", value, form)
            else:
                p.dedup = _as_float("dedup", value, form)
                if not 0.0 < p.dedup <= 1.0:
                    raise _bad("dedup must be true/false or a threshold in (0, 1]")
        elif key == "filter":
            if form and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise _bad("filter must be a JSON object") from None
            if not isinstance(value, dict):
                raise _bad("filter must be a JSON object {field: condition}")
            p.filter = value or None
        elif key == "encoder":
            p.encoder = _as_str("encoder", value, 200)
        elif key == "weight":
            p.weight = _as_float("weight", value, form)
            if not 0.0 <= p.weight <= 1.0:
                raise _bad("weight must be in [0, 1]")
        elif key == "method":
            p.method = _as_str("method", value, 50)
        elif key == "vector":
            if form and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    raise _bad("vector must be a JSON list of numbers") from None
            if not isinstance(value, list) or not value or len(value) > 8192 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
                raise _bad("vector must be a non-empty list of numbers")
            p.vector = value
        else:
            p.extra[key] = value
    if upload is not None:
        if p.image is not None:
            raise _bad("send the image once: as a file upload or as base64, not both")
        p.image = upload
    if p.image is not None and p.image_id is not None:
        raise _bad("give either image or image_id, not both")
    if require_image and p.image is None and p.image_id is None:
        raise InvalidQueryError("missing image: upload an image file, send it base64-encoded, or give image_id")
    if require_query and not p.has_query:
        raise InvalidQueryError("missing query: give text, image (upload or base64), image_id or vector")
    return p


def _looks_number(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return False


def result_json(engine, hit, query: QueryPayload | None = None) -> dict[str, Any]:
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
