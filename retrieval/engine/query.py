"""Query types (``Hit``, ``QueryContext``, ``SearchResponse``) and weighted text terms.

Weighted terms follow rclip: ``"+a cat"`` adds, ``"-a dog"`` subtracts, ``"0.5:snow"`` adds with
weight 0.5, a plain ``"a cat"`` adds with weight 1. The query vector is the normalised weighted sum
of the normalised term vectors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import InvalidQueryError
from retrieval.types import Hit

MAX_TERMS = 16
MAX_TEXT_CHARS = 1000
_WEIGHTED = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*:\s*(.*)$", re.S)


@dataclass
class QueryContext:
    """An embedded query, as re-ranking and attribution need it."""

    vector: np.ndarray            # unit float32 [d] in `encoder`'s space
    encoder: str
    text: str | None = None
    image: Image.Image | None = None   # the decoded query image, if any (see get_image for image_id)
    image_id: str | None = None
    upload_id: str | None = None       # the content id of uploaded image bytes (what the index would call them)
    instruction: str | None = None
    terms: list[tuple[float, str]] = field(default_factory=list)
    local: tuple[np.ndarray, tuple[int, int]] | None = None   # (raw tokens [p, C], grid) from the same pass
    local_fine: tuple[np.ndarray, tuple[int, int]] | None = None   # the fine layer's (tokens, grid), same pass
    image_vector: np.ndarray | None = None   # the unit image vector before an instruction was composed in
    _image_loader: Callable[[], Image.Image] | None = field(default=None, repr=False, compare=False)

    def get_image(self) -> Image.Image | None:
        """The query image: the uploaded one, or the indexed image of an ``image_id`` query (loaded
        from its source file on first use)."""
        if self.image is None and self._image_loader is not None:
            self.image = self._image_loader()
        return self.image


@dataclass
class SearchResponse:
    """What ``Engine.search`` returns: global top-k ``hits`` plus the embedded ``query``."""

    hits: list[Hit]
    query: QueryContext
    encoder: str
    took_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)   # embed_ms, search_ms, rerank_ms, ...
    notes: list[str] = field(default_factory=list)             # what the user should know about this answer

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]


def parse_term(term: str) -> tuple[float, str]:
    """``"+a cat"`` → (1, "a cat"); ``"-a dog"`` → (-1, "a dog"); ``"0.5:snow"`` → (0.5, "snow")."""
    if not isinstance(term, str):
        raise InvalidQueryError(f"text terms must be strings, got {type(term).__name__}")
    raw = term.strip()
    weight = 1.0
    m = _WEIGHTED.match(raw)
    if m:
        weight, raw = float(m.group(1)), m.group(2).strip()
    elif raw[:1] in "+-" and raw[:1]:
        weight, raw = (1.0 if raw[0] == "+" else -1.0), raw[1:].strip()
    if not raw:
        raise InvalidQueryError(f"empty text term {term!r}")
    if len(raw) > MAX_TEXT_CHARS:
        raise InvalidQueryError(f"text term is {len(raw)} characters, over the limit of {MAX_TEXT_CHARS}")
    if not np.isfinite(weight):
        raise InvalidQueryError(f"bad weight in {term!r}")
    return weight, raw


def parse_terms(text: str | Sequence[str]) -> list[tuple[float, str]]:
    """A text query (one string, or a list of weighted terms) → [(weight, text), ...]."""
    if isinstance(text, str):
        items = [text]
    elif isinstance(text, (list, tuple)):
        items = list(text)
    else:
        raise InvalidQueryError("text must be a string or a list of strings")
    if not items:
        raise InvalidQueryError("empty text query")
    if len(items) > MAX_TERMS:
        raise InvalidQueryError(f"at most {MAX_TERMS} text terms per query, got {len(items)}")
    return [parse_term(t) for t in items]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Normalised weighted sum of normalised rows; raises if the terms cancel out."""
    v = np.asarray(vectors, dtype=np.float32)
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    out = (np.asarray(weights, dtype=np.float32)[:, None] * v).sum(axis=0)
    norm = float(np.linalg.norm(out))
    if not np.isfinite(norm) or norm < 1e-6:
        raise InvalidQueryError("the weighted query terms cancel out (zero vector); change the weights")
    return (out / norm).astype(np.float32)


def as_query_vector(vector: Any, dim: int) -> np.ndarray:
    """Validate a raw query embedding (list or array of ``dim`` finite numbers) → unit float32."""
    try:
        arr = np.asarray(vector, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InvalidQueryError(f"vector must be a list of {dim} numbers") from exc
    if arr.shape[0] != dim:
        raise InvalidQueryError(f"vector has {arr.shape[0]} dimensions; this encoder needs {dim}")
    norm = float(np.linalg.norm(arr))
    if not np.isfinite(norm) or norm < 1e-12:
        raise InvalidQueryError("vector must be finite and non-zero")
    return (arr / norm).astype(np.float32)
