"""``SearchRequest``: one search, validated once.

The server builds it from JSON or a multipart form (:meth:`SearchRequest.from_fields`), the CLI from its
flags, a Python caller directly; :meth:`retrieval.engine.Engine.search` receives it unchanged. Every
limit and rule lives here: ``MAX_K``, the query fields that may be combined, the filter's syntax, the
ranges of ``weight`` and ``dedup``. An unknown field is an error that names it.

>>> SearchRequest(text="a cat", k=10)
>>> SearchRequest(image=jpeg_bytes, instruction="in red", filter={"width": {"gte": 640}})
>>> SearchRequest.from_fields({"text": "a cat", "k": "5"}, form=True)     # a web form's strings
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image

from retrieval.errors import InvalidFieldError, InvalidQueryError
from retrieval.index.filters import parse_filter
from retrieval.index.shards import SearchConfig

MAX_K = 1000                  # results per query
SEARCH_PARAMS = ("nprobe", "efSearch", "ef_search", "k_factor")   # keys of a request's "params"
DEFAULT_K = 20
MAX_TEXT_CHARS = 1000         # one text, instruction or term
MAX_VECTOR_DIM = 8192
DEFAULT_DEDUP_THRESHOLD = 0.98
METHODS = ("auto", "fusion", "sum", "arithmetic", "caption", "fused")   # retrieval.compose.METHODS + auto
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


# -- field validators: each takes (name, value) and returns the clean value or raises -----------------
def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidFieldError(f"{name} must be an integer in {lo}..{hi}")
    if not lo <= int(value) <= hi:
        raise InvalidQueryError(f"{name} must be in {lo}..{hi}, got {value}")
    return int(value)


def check_number(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)):
        raise InvalidFieldError(f"{name} must be a number in [{lo:g}, {hi:g}]")
    if not lo <= float(value) <= hi:
        raise InvalidFieldError(f"{name} must be in [{lo:g}, {hi:g}], got {value}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidFieldError(f"{name} must be true or false")
    return value


def check_str(name: str, value: Any, max_len: int = MAX_TEXT_CHARS) -> str:
    if not isinstance(value, str):
        raise InvalidFieldError(f"{name} must be a string")
    if len(value) > max_len:
        raise InvalidFieldError(f"{name} is too long (max {max_len} characters)")
    return value


def check_choice(name: str, value: Any, choices) -> str:
    if value not in choices:
        raise InvalidFieldError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


# -- form coercion: a multipart form sends every field as a string --------------------------------------
def form_bool(name: str, value: Any) -> Any:
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise InvalidFieldError(f"{name} must be true or false")
    return value


def form_number(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise InvalidFieldError(f"{name} must be a number") from None
        return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
    return value


def form_json(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise InvalidFieldError(f"{name} must be JSON") from None
    return value


def form_flag_or_number(name: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return form_number(name, value)
        except InvalidQueryError:
            return form_bool(name, value)
    return value


def fields_of(cls, fields: dict[str, Any], *, form: bool, coerce: dict[str, Callable], what: str) -> dict[str, Any]:
    """``fields`` (a JSON object or a form) → keyword arguments of the request dataclass ``cls``.
    Unknown names are an error that names them; blank form fields and JSON nulls mean "not given"."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise InvalidFieldError(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                                f"for {what}; it takes {', '.join(sorted(known))}")
    out = {}
    for key, value in fields.items():
        if value is None or (form and isinstance(value, str) and not value.strip()):
            continue
        if form and key in coerce:
            value = coerce[key](key, value)
        out[key] = value
    return out


@dataclass
class SearchRequest:
    """One query. Exactly one of ``text`` / ``image`` / ``image_id`` / ``vector`` (text may join an image:
    it then acts as the instruction).

    * ``text``: a string, or weighted terms ``["+a cat", "-a dog", "0.5:snow"]``;
    * ``image``: encoded bytes or a PIL image; ``image_id``: an indexed image; ``vector``: a raw embedding
      in ``encoder``'s space;
    * ``instruction``: "this image, but ..." (needs an image); ``method``/``weight``: how it is composed;
    * ``encoder``: which of the index's encoders answers (default: the text encoder for text, else the
      index's default);
    * ``k``: how many results (1..``MAX_K``);
    * ``offset``: skip the first ``offset`` results (a next page: ranks ``offset .. offset + k - 1`` of the
      same ranking; ``offset + k`` ≤ ``MAX_K``);
    * ``filter``: metadata conditions (:mod:`retrieval.index.filters`); ``params``: ``{"nprobe", "efSearch"}``;
    * ``rerank``: re-rank with local features; ``dedup``: drop near-identical results (true = cosine ≥ 0.98,
      or a threshold in (0, 1]); ``colour``: colour words count on an index with colour-names.
    * ``box``: ``[x0, y0, x1, y1]`` in pixels of the query image: that part is searched as its own query;
      ``regions``: also search the query's proposed object regions, results per region + a fused list
      (:mod:`retrieval.regions`, docs/regions.md).
    """

    text: str | list[str] | None = None
    image: bytes | Image.Image | None = field(default=None, repr=False)
    image_id: str | None = None
    vector: Any = field(default=None, repr=False)
    instruction: str | None = None
    encoder: str | None = None
    k: int = DEFAULT_K
    offset: int = 0
    rerank: bool = False
    filter: dict[str, Any] | None = None
    dedup: bool | float = False
    params: Any = None
    weight: float | None = None
    method: str = "auto"
    colour: bool = True
    box: Any = None               # [x0, y0, x1, y1] pixels of the query image: search that part (retrieval.regions)
    regions: bool = False         # also search the query's proposed object regions (retrieval.regions)

    # how a multipart form's strings become values (JSON sends typed values)
    FORM: ClassVar[dict[str, Callable]] = {
        "k": form_number, "offset": form_number, "rerank": form_bool, "colour": form_bool, "weight": form_number,
        "dedup": form_flag_or_number, "filter": form_json, "vector": form_json, "params": form_json,
        "regions": form_bool}            # a form's box "x0,y0,x1,y1" or "[...]" is parsed by parse_box

    def __post_init__(self) -> None:
        self._check_query()
        self.k = check_int("k", self.k, 1, MAX_K)
        self.offset = check_int("offset", self.offset, 0, MAX_K - self.k)   # ranks offset..offset+k of one ranking
        self.rerank = check_bool("rerank", self.rerank)
        self.colour = check_bool("colour", self.colour)
        self._check_regions()
        if self.encoder is not None:
            self.encoder = check_str("encoder", self.encoder, 200)
        self.method = "auto" if self.method in (None, "") else check_str("method", self.method, 50)
        if self.method not in METHODS:
            raise InvalidQueryError(f"unknown composition method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.weight is not None:
            self.weight = check_number("weight", self.weight, 0.0, 1.0)
        if self.dedup is None or self.dedup is False or (self.dedup == 0 and not isinstance(self.dedup, bool)):
            self.dedup = False
        elif self.dedup is not True:
            if isinstance(self.dedup, str):
                raise InvalidFieldError("dedup must be true/false or a cosine threshold in (0, 1]")
            self.dedup = check_number("dedup", self.dedup, 0.0, 1.0)
            if self.dedup <= 0.0:
                raise InvalidFieldError("dedup must be true/false or a cosine threshold in (0, 1]")
        if self.filter is not None:
            if not isinstance(self.filter, dict):
                raise InvalidFieldError("filter must be a JSON object {field: condition}")
            parse_filter(self.filter)          # syntax now, before the (slower) embedding
            self.filter = self.filter or None
        if self.params is not None and not isinstance(self.params, (dict, SearchConfig)):
            raise InvalidFieldError('params must be an object {"nprobe": N, "efSearch": N}')
        if isinstance(self.params, dict):
            for key, value in self.params.items():
                if key not in SEARCH_PARAMS:
                    lower = {p.lower(): p for p in SEARCH_PARAMS}
                    close = [lower[c] for c in difflib.get_close_matches(str(key).lower(), list(lower), n=1)]
                    raise InvalidFieldError(f"params has no field {key!r}" + (f" (did you mean {close[0]!r}?)"
                                            if close else f"; it takes {', '.join(SEARCH_PARAMS)}"))
                check_int(f"params.{key}", value, 1, 100_000)

    def _check_regions(self) -> None:
        """``box`` (four numbers with an area; inside the picture is checked once it is decoded) and ``regions``
        need an image query."""
        self.regions = check_bool("regions", self.regions)
        if self.box is not None:
            from retrieval.regions.box import parse_box

            self.box = parse_box(self.box)
        if (self.box is not None or self.regions) and not self.has_image:
            raise InvalidQueryError(f"{'box' if self.box is not None else 'regions'} needs an image query "
                                    "(image or image_id)")

    def _check_query(self) -> None:
        if isinstance(self.text, str):
            check_str("text", self.text)
            if not self.text.strip():
                self.text = None
        elif isinstance(self.text, (list, tuple)):
            if not self.text or not all(isinstance(t, str) for t in self.text):
                raise InvalidFieldError("text must be a string or a list of strings")
            self.text = [check_str("text", t) for t in self.text]
        elif self.text is not None:
            raise InvalidFieldError("text must be a string or a list of strings")
        if self.image is not None and not isinstance(self.image, (bytes, bytearray, Image.Image)):
            raise InvalidFieldError("image must be encoded image bytes (or a PIL image)")
        if self.image_id is not None:
            self.image_id = check_str("image_id", self.image_id, 64).strip()
        if self.instruction is not None:
            check_str("instruction", self.instruction)
            if not self.instruction.strip():
                self.instruction = None          # a blank instruction is no instruction
        if self.vector is not None:
            if isinstance(self.vector, np.ndarray):
                if self.vector.size == 0 or self.vector.size > MAX_VECTOR_DIM:
                    raise InvalidFieldError("vector must be a non-empty list of numbers")
            elif not isinstance(self.vector, (list, tuple)) or not self.vector or len(self.vector) > MAX_VECTOR_DIM \
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in self.vector):
                raise InvalidFieldError("vector must be a non-empty list of numbers")
        given = [n for n in ("text", "image", "image_id", "vector") if getattr(self, n) is not None]
        if not given:
            raise InvalidQueryError("missing query: give text, image (upload or base64), image_id or vector")
        if self.image is not None and self.image_id is not None:
            raise InvalidQueryError("give either image or image_id, not both")
        if self.vector is not None and len(given) > 1:
            raise InvalidQueryError("a raw vector query cannot be combined with text or images")
        has_image = self.image is not None or self.image_id is not None
        if self.instruction is not None and not has_image and self.text is None:
            raise InvalidQueryError("an instruction needs an image (image or image_id) to apply to")
        if self.text is not None and has_image and self.instruction is None:
            if not isinstance(self.text, str):
                raise InvalidQueryError("with an image, text must be one string (it acts as the instruction)")
            self.instruction, self.text = self.text, None      # "this image, but ..."

    @classmethod
    def from_fields(cls, fields: dict[str, Any], *, form: bool = False, **given: Any) -> "SearchRequest":
        """A request from a JSON object or a form's fields (``form``: values are strings to convert);
        ``given`` adds fields the caller decoded itself (an uploaded ``image``)."""
        return cls(**fields_of(cls, fields, form=form, coerce=cls.FORM, what="a search"), **given)

    # -- derived ---------------------------------------------------------------------------------------
    @property
    def has_image(self) -> bool:
        return self.image is not None or self.image_id is not None

    @property
    def dedup_threshold(self) -> float | None:
        """The cosine above which a result counts as a duplicate of a better one (None: keep all)."""
        if self.dedup is True:
            return DEFAULT_DEDUP_THRESHOLD
        return float(self.dedup) if self.dedup else None

    @property
    def composition(self) -> str:
        """The composition method the instruction gets: ``auto`` with an explicit ``weight`` (the image/text
        mix of ``sum``) means ``sum``."""
        return "sum" if self.method == "auto" and self.weight is not None else self.method

    def replace(self, **changes: Any) -> "SearchRequest":
        return dataclasses.replace(self, **changes)
