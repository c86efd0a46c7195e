"""Request schemas generated from the request dataclasses the server validates with.

Every ``init`` field of a request dataclass (:class:`retrieval.engine.request.SearchRequest`,
:mod:`server.requests`' ``AttributionRequest`` / ``DuplicatesRequest`` / ``ClassifyRequest``) becomes a
property: its JSON type from the field's annotation (:func:`type_schema`), its default from the field, its
description from the class docstring's ``name: text`` bullets. A field added to a dataclass is in the spec
at once. What an annotation cannot say — ranges, choices, the shape of an ``Any`` — is in
:data:`CONSTRAINTS`, keyed by field; the tests check each constraint against the dataclass (values at the
bounds pass, values beyond them are refused) and that it names only existing fields.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from typing import Any, Union

from PIL import Image

from retrieval.engine.request import MAX_K, MAX_TEXT_CHARS, MAX_VECTOR_DIM, METHODS, SEARCH_PARAMS, SearchRequest
from retrieval.explain.config import METHODS as ATTRIBUTION_METHODS
from server.requests import AttributionRequest, ClassifyRequest, DuplicatesRequest, UploadRef

ID_PATTERN = "^[0-9a-f]{15}$"
MAX_SEARCH_PARAM = 100_000

#: what the annotations cannot say, per request class and field (merged over the generated schema)
CONSTRAINTS: dict[type, dict[str, dict[str, Any]]] = {
    SearchRequest: {
        "k": {"minimum": 1, "maximum": MAX_K},
        "offset": {"minimum": 0, "maximum": MAX_K - 1},
        "method": {"enum": list(METHODS)},
        "weight": {"minimum": 0.0, "maximum": 1.0},
        "image_id": {"maxLength": 64},
        "instruction": {"maxLength": MAX_TEXT_CHARS},
        "vector": {"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": MAX_VECTOR_DIM},
        "params": {"type": "object", "additionalProperties": False,
                   "properties": {p: {"type": "integer", "minimum": 1, "maximum": MAX_SEARCH_PARAM}
                                  for p in SEARCH_PARAMS}},
        "box": {"type": "array", "items": {"type": "number", "minimum": 0}, "minItems": 4, "maxItems": 4},
        "image": {"description": "the query image: base64 in JSON (a data: URL too), a file in a multipart form"},
        "filter": {"type": "object", "additionalProperties": True,
                   "example": {"width": {"gte": 640}, "caption": {"contains": "cat"}}},
    },
    AttributionRequest: {
        "result_id": {"pattern": ID_PATTERN},
        "format": {"enum": ["png", "json"]},
        "attribution_method": {"enum": list(ATTRIBUTION_METHODS)},
        "side": {"enum": ["result", "query"]},
        "alpha": {"minimum": 0.0, "maximum": 1.0},
        "max_side": {"minimum": 1, "maximum": 100_000},
    },
    DuplicatesRequest: {
        "image": {"description": "the image: base64 in JSON (a data: URL too), a file in a multipart form"},
        "k": {"minimum": 1, "maximum": 1000},
        "threshold": {"minimum": -2.0, "maximum": 3.0},
        "image_id": {"maxLength": 64},
    },
    ClassifyRequest: {
        "image": {"description": "the image: base64 in JSON (a data: URL too), a file in a multipart form"},
        "k": {"minimum": 1, "maximum": 1000},
        "vocabulary": {"enum": ["auto", "captions", "imagenet21k"]},
        "image_id": {"maxLength": 64},
    },
}

#: fields of a request dataclass that are not body fields (``AttributionRequest.query`` is built from the
#: body's search fields)
NOT_IN_BODY = {AttributionRequest: ("query",)}

#: body fields the server takes before a request dataclass sees the body (``upload``: a token of
#: ``POST /api/uploads``, swapped for the image by ``server.requests.read_body``)
SERVER_FIELDS = {SearchRequest: UploadRef, DuplicatesRequest: UploadRef, ClassifyRequest: UploadRef}


def body_fields(cls: type) -> list[dataclasses.Field]:
    """The fields a body may carry for ``cls`` (what ``fields_of`` accepts)."""
    skip = NOT_IN_BODY.get(cls, ())
    extra = list(dataclasses.fields(SERVER_FIELDS[cls])) if cls in SERVER_FIELDS else []
    return [f for f in [*dataclasses.fields(cls), *extra] if f.init and f.name not in skip]


def _annotation(cls: type, f: dataclasses.Field) -> Any:
    """The field's annotation as a type (annotations are strings under ``from __future__ import annotations``)."""
    if not isinstance(f.type, str):
        return f.type
    module = sys.modules.get(cls.__module__)
    try:
        return eval(f.type, vars(module) if module else {}, dict(vars(typing)))   # noqa: S307 - our own source
    except Exception:  # noqa: BLE001 - a name only imported for type checking: describe the field untyped
        return Any


def type_schema(tp: Any, *, form: bool = False) -> dict[str, Any]:
    """An OpenAPI 3.0 schema for a Python annotation. Image bytes (or a PIL image) are a base64 string in
    JSON and a file in a multipart form."""
    if tp is Any or tp is object:
        return {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        nullable = type(None) in args
        parts: list[dict] = []
        for arg in args:
            if arg is not type(None):
                schema = type_schema(arg, form=form)
                if schema not in parts:
                    parts.append(schema)
        out: dict[str, Any] = {} if any(p == {} for p in parts) else parts[0] if len(parts) == 1 \
            else {"anyOf": parts}
        return {**out, "nullable": True} if nullable else out
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if tp in (bytes, bytearray) or tp is Image.Image:
        return {"type": "string", "format": "binary" if form else "byte"}
    if origin in (list, tuple) or tp in (list, tuple):
        item = args[0] if args and args[-1] is not Ellipsis or len(args) == 2 else Any
        return {"type": "array", "items": type_schema(item, form=form)}
    if origin is dict or tp is dict:
        value = args[1] if len(args) == 2 else Any
        return {"type": "object", "additionalProperties": type_schema(value, form=form) or True}
    return {}


_BULLET_ITEM = re.compile(r"((?:``\w+``\s*/\s*)*``\w+``)\s*:\s*(.+?)(?=;\s*(?:``\w+``\s*/\s*)*``\w+``\s*:|$)", re.S)


def docstring_fields(cls: type) -> dict[str, str]:
    """``{field: description}`` from the class docstring's bullets ``* ``name``: text; ``other``: text``."""
    doc = cls.__doc__ or ""
    bullets = re.split(r"\n\s*\*\s+", "\n" + doc)
    out: dict[str, str] = {}
    for bullet in bullets[1:]:
        text = " ".join(bullet.split())
        for names, desc in _BULLET_ITEM.findall(text):
            for name in re.findall(r"``(\w+)``", names):
                out.setdefault(name, markdown(desc.strip().rstrip(";").strip()))
    return out


def markdown(text: str) -> str:
    """reST inline markup of a docstring as the Markdown OpenAPI descriptions use: ````x```` → `x`,
    ``:mod:`a.b``` → `a.b`."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    return re.sub(r"``([^`]+)``", r"`\1`", text)


def _default(f: dataclasses.Field) -> Any:
    if f.default is dataclasses.MISSING:
        return dataclasses.MISSING
    value = f.default
    return value if value is None or isinstance(value, (bool, int, float, str)) else dataclasses.MISSING


def field_schema(cls: type, f: dataclasses.Field, *, form: bool = False, doc: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    schema = dict(type_schema(_annotation(cls, f), form=form))
    extra = CONSTRAINTS.get(cls, {}).get(f.name)
    if extra:
        nullable = schema.get("nullable")
        if "type" in extra:             # the constraint gives the whole shape (an ``Any`` field)
            schema = {}
        schema.update(extra)
        if nullable:
            schema["nullable"] = True
    if form and f.name in ("image",):
        schema = {"type": "string", "format": "binary"}
    default = _default(f)
    if default is not dataclasses.MISSING and default is not None:
        schema["default"] = default
    description = f.metadata.get("description") or (doc if doc is not None else docstring_fields(cls)).get(f.name)
    if description and "description" not in schema:
        schema["description"] = description
    return schema


def request_schema(*classes: type, form: bool = False, description: str | None = None) -> dict[str, Any]:
    """One body schema from the body fields of ``classes`` (a later class's field wins); strict: an
    unknown field is a 400, so ``additionalProperties`` is false."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for cls in classes:
        doc = docstring_fields(cls)
        for f in body_fields(cls):
            properties[f.name] = field_schema(cls, f, form=form, doc=doc)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
    out: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    return out


def first_paragraph(cls: type) -> str:
    return markdown(" ".join((cls.__doc__ or "").strip().split("\n\n")[0].split()))
