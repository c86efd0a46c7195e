"""HTTP bodies → typed, validated requests, once per request.

A body is a JSON object (``Content-Type: application/json``; another type is a 415
``unsupported_media_type``, so a cross-site ``text/plain`` POST cannot pass for JSON; nesting deeper
than ``MAX_JSON_DEPTH`` is a 400 ``invalid_json``) or a multipart/urlencoded form (an ``image`` file
upload, repeated ``text`` fields = weighted terms). Images travel as uploads or base64 (a ``data:``
URL too), or as ``upload``: a token of ``POST /api/uploads`` (:func:`take_upload`); the server never
fetches URLs. Each endpoint has one request type; an unknown field is a 400 that names it. A request that
carries an image holds one of ``LOUPE_MAX_DECODES`` decode slots until it is answered
(:func:`hold_decode_slot`; none free within ``LOUPE_DECODE_WAIT`` s: 503 ``busy``).

* ``/api/search`` → :class:`retrieval.engine.request.SearchRequest` (the library's own type);
* ``/api/attribution`` → :class:`AttributionRequest` (a ``SearchRequest`` + what to explain and how);
* ``/api/duplicates`` → :class:`DuplicatesRequest`; ``/api/classify`` → :class:`ClassifyRequest`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from flask import current_app, g, request_tearing_down
from flask import request as flask_request

from retrieval import settings
from retrieval.engine.request import (
    SearchRequest,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_str,
    fields_of,
    form_bool,
    form_number,
)
from retrieval.errors import ImageTooLargeError, InvalidImageError, InvalidQueryError, UnknownIdError
from retrieval.explain.config import METHODS as ATTRIBUTION_METHODS
from server.errors import BadRequestError, InvalidJsonError, ServerBusyError, UnsupportedMediaTypeError

ID = re.compile(r"^[0-9a-f]{15}$")
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")
MAX_JSON_DEPTH = 32         # a search filter needs a handful of levels


def is_json_type(mimetype: str) -> bool:
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def parse_json(raw: bytes) -> Any:
    """A JSON body, or ``InvalidJsonError`` (also for nesting deeper than ``MAX_JSON_DEPTH``)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidJsonError(f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidJsonError(f"request body is not valid JSON: {exc}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise InvalidJsonError(f"request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return value


def json_depth(value: Any) -> int:
    """How deeply lists and objects nest in ``value`` (a scalar: 0), without recursion."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        depth = max(depth, level)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return depth


# -- the body ----------------------------------------------------------------------------------------
def read_body(request=None) -> tuple[dict[str, Any], bool]:
    """The request's fields (a JSON object or a form) and whether they are form strings.
    An uploaded ``image`` file and a base64 ``image`` both become bytes under ``"image"``."""
    request = request or flask_request
    limit = int(current_app.config["MAX_UPLOAD_BYTES"])
    mimetype = (request.mimetype or "").lower()
    if mimetype in FORM_TYPES:
        fields: dict[str, Any] = dict(request.form.items())
        texts = [t for t in request.form.getlist("text") if t.strip()]
        if len(texts) > 1:
            fields["text"] = texts          # repeated text fields = weighted terms
        files = request.files.getlist("image")
        if len(files) > 1:
            raise BadRequestError("upload one image per query")
        if files:
            if fields.get("image", "").strip():
                raise BadRequestError("send the image once: as a file upload or as base64, not both")
            data = files[0].read(limit + 1)
            if len(data) > limit:
                raise ImageTooLargeError(f"image is over the upload limit of {limit // (1024 * 1024)} MB")
            if not data:
                raise InvalidImageError("the uploaded image file is empty")
            fields["image"] = data
        form = True
    else:
        raw = request.get_data(cache=True)
        if not raw.strip():
            raise InvalidJsonError("empty request body: send a JSON object (Content-Type: application/json) "
                                   "or a multipart form")
        else:
            if not is_json_type(mimetype):
                raise UnsupportedMediaTypeError(
                    f"send the body as JSON (Content-Type: application/json) or as a form (multipart/form-data, "
                    f"application/x-www-form-urlencoded), not {mimetype or 'without a Content-Type'}")
            fields = parse_json(raw)
            if not isinstance(fields, dict):
                raise InvalidJsonError("request body must be a JSON object")
            form = False
    for key in ("image_url", "url"):
        if key in fields:
            raise BadRequestError("this server does not fetch URLs; upload the image or send it as base64")
    if isinstance(fields.get("image"), str):
        value = fields["image"].strip()
        fields["image"] = decode_base64_image(value, limit) if value else None
    elif fields.get("image") is not None and not isinstance(fields["image"], bytes):
        raise BadRequestError("image must be a base64 string (JSON) or a file upload (multipart)")
    if "upload" in fields:
        take_upload(fields)
    if fields.get("image") is not None:
        hold_decode_slot()
    return fields, form


@dataclass
class UploadRef:
    """The body field every image endpoint takes in place of ``image``: a token of ``POST /api/uploads``."""

    upload: str | None = dataclasses.field(default=None, metadata={"description": (
        "a token from POST /api/uploads: the image uploaded once, in place of image (an unknown or expired "
        "token is a 404 upload_not_found: upload again)")})


def take_upload(fields: dict[str, Any]) -> None:
    """Swap ``fields["upload"]`` (a token of ``POST /api/uploads``) for the kept image bytes, in place."""
    from server.uploads import upload_cache

    token = fields.pop("upload")
    if token is None or (isinstance(token, str) and not token.strip()):
        return
    if fields.get("image") is not None:
        raise BadRequestError("send the image once: as an upload token or as the image, not both")
    if not isinstance(token, str):
        raise BadRequestError("upload must be a string: a token from POST /api/uploads")
    fields["image"] = upload_cache().get(token).data


# -- bounded decoding ----------------------------------------------------------------------------------
_SLOTS_LOCK = threading.Lock()
RETRY_AFTER_S = 2


def hold_decode_slot() -> None:
    """Take one of the app's decode slots for the rest of this request (it carries an image to decode).

    At most ``LOUPE_MAX_DECODES`` (default 2) requests with an uploaded image are decoded and answered at
    once — the decoded picture lives until the answer is sent — so their memory is bounded by that many
    times ``LOUPE_MAX_DECODE_MB``. A request waits up to ``LOUPE_DECODE_WAIT`` seconds (default 5) for a
    slot, then answers 503 ``busy`` with ``Retry-After``. Both settings are read when a request asks."""
    if g.get("_loupe_decode_slot") is not None:
        return
    size = settings.max_decodes()
    with _SLOTS_LOCK:
        held = current_app.extensions.get("loupe_decode_slots")
        if held is None or held[0] != size:         # first upload, or LOUPE_MAX_DECODES changed
            held = (size, threading.BoundedSemaphore(size))
            current_app.extensions["loupe_decode_slots"] = held
    slots = held[1]
    wait = settings.decode_wait()
    if not slots.acquire(timeout=wait):
        raise ServerBusyError(f"the server is decoding {size} other image{'s' if size > 1 else ''} (the limit, "
                              f"LOUPE_MAX_DECODES) and none finished within {wait:g} s; retry in a moment",
                              retry_after=RETRY_AFTER_S)
    g._loupe_decode_slot = slots


def _release_decode_slot(sender, **_extra) -> None:
    slots = g.pop("_loupe_decode_slot", None)
    if slots is not None:
        slots.release()


request_tearing_down.connect(_release_decode_slot)     # runs after every request, errors included


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


def _split(fields: dict[str, Any], own) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fields of the dataclass ``own``, the rest)."""
    names = {f.name for f in dataclasses.fields(own) if f.init}
    return {k: v for k, v in fields.items() if k in names}, {k: v for k, v in fields.items() if k not in names}


def _image_query(req) -> None:
    """The image rule of the image-only endpoints: exactly one of image / image_id."""
    if req.image is not None and req.image_id is not None:
        raise InvalidQueryError("give either image or image_id, not both")
    if req.image is None and req.image_id is None:
        raise InvalidQueryError("missing image: upload an image file, send it base64-encoded, or give image_id")
    if req.image_id is not None:
        req.image_id = check_str("image_id", req.image_id, 64).strip()
    if req.encoder is not None:
        req.encoder = check_str("encoder", req.encoder, 200)


# -- per endpoint --------------------------------------------------------------------------------------
def search_request(request=None) -> SearchRequest:
    fields, form = read_body(request)
    return SearchRequest.from_fields(fields, form=form)


@dataclass
class AttributionRequest:
    """``/api/attribution``: the query (``SearchRequest`` fields) plus which result to explain and how."""

    result_id: str
    format: str = "png"
    attribution_method: str = "auto"
    side: str = "result"
    alpha: float = 0.5
    max_side: float | None = None
    query: SearchRequest | None = None

    FORM: ClassVar[dict[str, Callable]] = {"alpha": form_number, "max_side": form_number}

    def __post_init__(self) -> None:
        self.result_id = check_str("result_id", self.result_id, 64).strip()
        if not self.result_id:
            raise InvalidQueryError("missing result_id: the id of the result to explain")
        if not ID.match(self.result_id):
            raise UnknownIdError(f"unknown image id {self.result_id!r}")
        self.format = check_choice("format", self.format, ("png", "json"))
        self.attribution_method = check_choice("attribution_method", self.attribution_method, ATTRIBUTION_METHODS)
        self.side = check_choice("side", self.side, ("result", "query"))
        self.alpha = check_number("alpha", self.alpha, 0.0, 1.0)
        if self.max_side is not None:
            self.max_side = check_number("max_side", self.max_side, 1, 100_000)

    @classmethod
    def parse(cls, request=None) -> "AttributionRequest":
        fields, form = read_body(request)
        own, rest = _split(fields, cls)
        own.pop("query", None)
        if "result_id" not in own:
            raise InvalidQueryError("missing result_id: the id of the result to explain")
        query = SearchRequest.from_fields(rest, form=form)
        return cls(**fields_of(cls, own, form=form, coerce=cls.FORM, what="an attribution"), query=query)


@dataclass
class DuplicatesRequest:
    """``/api/duplicates``: is this image a copy of an indexed one? ``k`` candidates (1..100), an optional
    decision ``threshold``, background ``normalize``, local ``verify`` and query ``regions``."""

    image: bytes | None = None
    image_id: str | None = None
    encoder: str | None = None
    k: int = 10
    threshold: float | None = None
    normalize: bool = True
    verify: bool | None = None
    regions: bool = True

    FORM: ClassVar[dict[str, Callable]] = {"k": form_number, "threshold": form_number, "normalize": form_bool,
                                           "verify": form_bool, "regions": form_bool}

    def __post_init__(self) -> None:
        _image_query(self)
        self.k = min(check_int("k", self.k, 1, 1000), 100)
        if self.threshold is not None:
            self.threshold = check_number("threshold", self.threshold, -2.0, 3.0)
        self.normalize = check_bool("normalize", self.normalize)
        self.regions = check_bool("regions", self.regions)
        if self.verify is not None:
            self.verify = check_bool("verify", self.verify)

    @classmethod
    def parse(cls, request=None) -> "DuplicatesRequest":
        fields, form = read_body(request)
        if fields.get("text") is not None or fields.get("vector") is not None:
            raise BadRequestError("/api/duplicates takes an image (upload, base64 or image_id), not text or vectors")
        return cls(**fields_of(cls, fields, form=form, coerce=cls.FORM, what="/api/duplicates"))


@dataclass
class ClassifyRequest:
    """``/api/classify``: ``k`` labels (default 5) for an image from a ``vocabulary`` (``captions`` = the
    index's captions, ``imagenet21k``; default ``auto``: the captions when the index has enough)."""

    image: bytes | None = None
    image_id: str | None = None
    encoder: str | None = None
    k: int = 5
    vocabulary: str = "auto"

    FORM: ClassVar[dict[str, Callable]] = {"k": form_number}

    def __post_init__(self) -> None:
        _image_query(self)
        self.k = check_int("k", self.k, 1, 1000)
        self.vocabulary = check_choice("vocabulary", self.vocabulary or "auto", ("auto", "captions", "imagenet21k"))

    @classmethod
    def parse(cls, request=None) -> "ClassifyRequest":
        fields, form = read_body(request)
        return cls(**fields_of(cls, fields, form=form, coerce=cls.FORM, what="/api/classify"))
