"""What a query becomes on its way: ``QueryContext`` (the embedded query, as re-ranking and attribution
need it) and ``SearchResponse`` (the engine's answer)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

from retrieval.types import Hit


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


#: what a response's scores are: ``cosine`` (the encoder's cosine similarity, in [-1, 1]; binary codes: the
#: codes' cosine), ``fused_z`` (a weighted sum of z-scores over a pooled candidate list: instruction fusion,
#: colour-aware text search; unbounded, comparable only within one answer), ``reranked`` (the cosine plus
#: local-feature evidence, ``rerank``; may exceed 1), ``regions`` (the fused list of a ``regions`` query: the best
#: cosine of the picture or a region plus a region's gain over the picture, may exceed 1; docs/regions.md)
SCORE_KINDS = ("cosine", "fused_z", "reranked", "regions")


@dataclass
class SearchResponse:
    """What ``Engine.search`` returns: global top-k ``hits`` plus the embedded ``query``."""

    hits: list[Hit]
    query: QueryContext
    encoder: str
    took_ms: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)   # embed_ms, search_ms, rerank_ms, ...
    notes: list[str] = field(default_factory=list)             # what the user should know about this answer
    score_kind: str = "cosine"    # what the hits' scores are: one of SCORE_KINDS
    box: tuple[int, int, int, int] | None = None   # the query box searched (request ``box``), in query pixels
    regions: Any = None          # request ``regions``: a retrieval.regions.RegionSearch (per-region results)

    def __iter__(self):
        return iter(self.hits)

    def __len__(self) -> int:
        return len(self.hits)

    def __getitem__(self, i):
        return self.hits[i]

    @property
    def ids(self) -> list[str]:
        return [h.id for h in self.hits]
