"""Metadata filters: equality, ranges and substring tests on metadata columns.

A filter is a JSON object ``{field: condition, ...}``; all conditions must hold (AND):

* ``{"caption": "A cat."}`` – equality; ``{"width": [640, 800]}`` – one of (``in``);
* ``{"width": {"gte": 100, "lt": 2000}}`` – ranges (``gt``, ``gte``, ``lt``, ``lte``, ``eq``, ``ne``);
* ``{"caption": {"contains": "cat"}}`` – case-insensitive substring; ``prefix`` also works;
* fields are metadata columns (``id source path caption width height sha256 size mtime``) or keys of
  the ``extra`` object (columns of the indexed manifest), written plainly or as ``extra.KEY``; a field no
  image has is an error naming the closest one (:func:`check_fields`, called by the engine);
* ``{"colour-names": "red"}`` / ``["red", "pink"]`` – images showing that colour (an index with the
  colour-names encoder; the engine computes it from the stored colour vectors, not from this module).

``filter_mask(table, conditions)`` gives one boolean per metadata row; the engine turns it into a
FAISS ``IDSelector`` so filtered search loses no recall.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from retrieval.errors import InvalidQueryError

RANGE_OPS = ("eq", "ne", "gt", "gte", "lt", "lte")
STRING_OPS = ("contains", "prefix")
OPS = RANGE_OPS + STRING_OPS + ("in",)
COLUMNS = ("id", "source", "path", "caption", "width", "height", "sha256", "size", "mtime")
MAX_CONDITIONS = 32


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any


def _scalar(value: Any, where: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    raise InvalidQueryError(f"filter {where}: value must be a string, number, boolean or null")


def parse_filter(obj: Any) -> list[Condition]:
    """Validate a filter object into conditions; raises ``InvalidQueryError`` with the reason."""
    if obj is None:
        return []
    if not isinstance(obj, dict):
        raise InvalidQueryError("filter must be a JSON object {field: condition}")
    out: list[Condition] = []
    for name, cond in obj.items():
        if not isinstance(name, str) or not name:
            raise InvalidQueryError("filter field names must be non-empty strings")
        if isinstance(cond, dict):
            if not cond:
                raise InvalidQueryError(f"filter {name!r}: empty condition object")
            for op, value in cond.items():
                if op not in OPS:
                    raise InvalidQueryError(f"filter {name!r}: unknown operator {op!r}; use one of {', '.join(OPS)}")
                if op == "in":
                    if not isinstance(value, list):
                        raise InvalidQueryError(f"filter {name!r}: 'in' needs a list")
                    out.append(Condition(name, "in", tuple(_scalar(v, name) for v in value)))
                elif op in STRING_OPS:
                    if not isinstance(value, str):
                        raise InvalidQueryError(f"filter {name!r}: {op!r} needs a string")
                    out.append(Condition(name, op, value))
                else:
                    value = _scalar(value, name)
                    if op in ("gt", "gte", "lt", "lte") and (value is None or isinstance(value, bool)):
                        raise InvalidQueryError(f"filter {name!r}: {op!r} needs a number or string")
                    out.append(Condition(name, op, value))
        elif isinstance(cond, list):
            out.append(Condition(name, "in", tuple(_scalar(v, name) for v in cond)))
        else:
            out.append(Condition(name, "eq", _scalar(cond, name)))
    if len(out) > MAX_CONDITIONS:
        raise InvalidQueryError(f"at most {MAX_CONDITIONS} filter conditions")
    return out


def check_fields(conditions: list[Condition], known: set[str] | frozenset[str]) -> None:
    """A condition on a field no image has would quietly match nothing (a typo looks like "no results"):
    raise ``InvalidQueryError`` naming the field and the closest one of ``known``."""
    for cond in conditions:
        if cond.field in known:
            continue
        plain = sorted(k for k in known if not k.startswith("extra."))
        lower = {k.lower(): k for k in plain}
        close = difflib.get_close_matches(cond.field.removeprefix("extra.").lower(), list(lower), n=1)
        hint = f"; did you mean {lower[close[0]]!r}?" if close else ""
        raise InvalidQueryError(f"filter field {cond.field!r}: no image of this index has it{hint} "
                                f"(fields: {', '.join(plain)})")


def table_fields(table) -> set[str]:
    """The fields a filter can name on one metadata table: its ``COLUMNS`` and the keys of any row's
    ``extra`` object (also as ``extra.KEY``)."""
    fields = {c for c in table.column_names if c in COLUMNS}
    if "extra" in table.column_names:
        for raw in set(table.column("extra").to_pylist()):
            try:
                extra = json.loads(raw) if raw else {}
            except (TypeError, ValueError):
                continue
            if isinstance(extra, dict):
                fields.update(extra)
                fields.update(f"extra.{k}" for k in extra)
    return fields


def filter_key(conditions: list[Condition]) -> str:
    return json.dumps([(c.field, c.op, c.value) for c in conditions], sort_keys=True, default=str)


def _column_values(table, name: str, extra_cache: dict, views: dict | None = None) -> np.ndarray:
    """A metadata column (or an ``extra`` key) as a numpy object/number array; a column with a ``views``
    function is compared as that function shows each value (cached with the table's other derived columns)."""
    if views and name in views and name in table.column_names:
        key = ("view", name)
        if key not in extra_cache:
            show = views[name]
            extra_cache[key] = np.array([show(v) for v in table.column(name).to_pylist()], dtype=object)
        return extra_cache[key]
    if name.startswith("extra."):
        key = name[6:]
    elif name in COLUMNS:
        col = table.column(name)
        arr = np.asarray(col.to_numpy(zero_copy_only=False))
        return arr
    else:
        key = name
    if "__extra__" not in extra_cache:
        parsed = []
        for raw in table.column("extra").to_pylist():
            try:
                val = json.loads(raw) if raw else {}
            except (TypeError, ValueError):
                val = {}
            parsed.append(val if isinstance(val, dict) else {})
        extra_cache["__extra__"] = parsed
    if key not in extra_cache:
        extra_cache[key] = np.array([row.get(key) for row in extra_cache["__extra__"]], dtype=object)
    return extra_cache[key]


def _compare(values: np.ndarray, op: str, target: Any) -> np.ndarray:
    out = np.zeros(len(values), dtype=bool)
    if op in STRING_OPS:
        t = target.lower()
        for i, v in enumerate(values):
            if isinstance(v, str):
                s = v.lower()
                out[i] = (t in s) if op == "contains" else s.startswith(t)
        return out
    if op == "in":
        allowed = set(target)
        for i, v in enumerate(values):
            try:
                out[i] = v in allowed or (isinstance(v, float) and v.is_integer() and int(v) in allowed)
            except TypeError:
                out[i] = False
        return out
    if values.dtype != object and op in RANGE_OPS and isinstance(target, (int, float)) \
            and not isinstance(target, bool) and np.issubdtype(values.dtype, np.number):
        fn = {"eq": np.equal, "ne": np.not_equal, "gt": np.greater, "gte": np.greater_equal,
              "lt": np.less, "lte": np.less_equal}[op]
        with np.errstate(invalid="ignore"):
            res = fn(values, target)
        return np.asarray(res, dtype=bool) & (~np.isnan(values) if values.dtype.kind == "f" else True)
    for i, v in enumerate(values):
        if op == "eq":
            out[i] = v == target
        elif op == "ne":
            out[i] = v != target
        else:
            if v is None or isinstance(v, bool) or isinstance(target, str) != isinstance(v, str):
                continue
            try:
                out[i] = {"gt": v > target, "gte": v >= target, "lt": v < target, "lte": v <= target}[op]
            except TypeError:
                out[i] = False
    return out


def filter_mask(table, conditions: list[Condition], extra_cache: dict | None = None,
                views: dict | None = None) -> np.ndarray:
    """One boolean per row of the metadata ``table``: True where every condition holds. ``views``
    (``{column: function}``): those columns are compared as the function shows their values (a server that
    hides paths filters by the relative paths its results show)."""
    extra_cache = {} if extra_cache is None else extra_cache
    mask = np.ones(table.num_rows, dtype=bool)
    for cond in conditions:
        values = _column_values(table, cond.field, extra_cache, views)
        mask &= _compare(values, cond.op, cond.value)
        if not mask.any():
            break
    return mask
