"""Locally matched regions of an image query and a result: the mutual nearest-neighbour matches of their
local features that RANSAC keeps (``retrieval.rerank.verify``), as grid maps and as lines in pixels."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from .grid import crop_box

__all__ = ["match_maps", "MAX_LINES"]

MAX_LINES = 24      # lines drawn / returned: the strongest kept matches


def _cell_centre(encoder, image: Image.Image, cell: int, grid: tuple[int, int]) -> list[float]:
    """Pixel (x, y) of grid cell ``cell``'s centre in ``image`` (the grid covers the encoder's crop)."""
    h, w = grid
    left, top, right, bottom = crop_box(encoder, image.size)
    row, col = divmod(int(cell), w)
    return [round(left + (col + 0.5) / w * (right - left), 1), round(top + (row + 0.5) / h * (bottom - top), 1)]


def match_maps(encoder, query_image: Image.Image, result_image: Image.Image, rerank_config=None
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Matched local regions: grid maps (query, result) of RANSAC-inlier mutual-NN matches, and ``info``
    with the counts and ``lines``: the kept matches (strongest first, at most ``MAX_LINES``) as
    ``{"query": [x, y], "result": [x, y], "similarity": s}`` in each image's pixels."""
    from retrieval.rerank.config import DEFAULT_CONFIG
    from retrieval.rerank.verify import verify_pair

    cfg = rerank_config or DEFAULT_CONFIG
    _, tokens, grid = encoder.encode_images_and_local([query_image, result_image])
    h, w = int(grid[0]), int(grid[1])
    pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    res = verify_pair(tokens[0], pos, tokens[1], pos, (h, w), (h, w), cfg)
    keep = res.inlier_mask if res.inliers >= 3 else np.ones(len(res.matches), bool)
    qmap, rmap = np.zeros(h * w), np.zeros(h * w)
    kept = []
    for (i, j), s, k in zip(res.matches, res.match_sims, keep):
        if k:
            qmap[i] += max(float(s), 0.0)
            rmap[j] += max(float(s), 0.0)
            kept.append((float(s), int(i), int(j)))
    kept.sort(key=lambda t: -t[0])
    lines = [{"query": _cell_centre(encoder, query_image, i, (h, w)),
              "result": _cell_centre(encoder, result_image, j, (h, w)), "similarity": round(s, 4)}
             for s, i, j in kept[:MAX_LINES]]
    info = {"matches": int(len(res.matches)), "inliers": int(res.inliers), "verified": bool(res.score > 0),
            "lines": lines}
    return qmap.reshape(h, w), rmap.reshape(h, w), info
