"""Explaining away the background: the part of the query that its best whole-picture matches do not explain.

A query that shows an object in front of (or pasted on) a picture that is itself indexed finds that picture
first; the object is then what the picture does *not* explain. ``explain`` compares the query's feature map
with the feature map of each of the whole-picture search's top hits (``saliency.canvas_tokens``: the same
padded square for both, one batched pass):

1. **Alignment.** Mutual nearest-neighbour matches of the two pictures' cell tokens are fitted with a 2-D
   affine transform by RANSAC (``retrieval.rerank.verify.ransac_affine``; coordinates in cells of the hit's
   grid, so a crop or a rescaled copy of the picture aligns too).
2. **Explained cells.** Each query cell is sent through the transform; its *explained similarity* is the
   best cosine between its token and the hit's tokens within ``radius`` cells of where it lands. A cell
   that lands outside the hit is not compared (unknown). With several hits, a cell takes the best of them.
3. **The residual.** A cell is explained when that similarity reaches ``explained_sim``; when the hits
   explain at least ``min_explained`` of the query's compared cells, the query is "a known picture plus
   something", and ``1 - explained similarity`` (0 where unknown) is the residual map: high on the
   something. ``proposals.py`` turns it into the ``"residual"`` region, ranked first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from retrieval.regions.saliency import CanvasTokens


@dataclass(frozen=True)
class ResidualConfig:
    hits: int = 2                  # top hits of the whole-picture search that may explain the query
    min_inliers: int = 6           # RANSAC inliers needed to trust an alignment ...
    min_inlier_ratio: float = 0.3  # ... and this fraction of the mutual nearest-neighbour matches
    ransac_threshold: float = 1.0  # RANSAC residual threshold, in cells of the hit's grid
    radius: float = 0.5            # a query cell meets the hit's cells within this many cells of where it lands
    explained_sim: float = 0.7     # ... and is explained when its best cosine with them reaches this
    min_explained: float = 0.5     # the residual counts when this fraction of the query's cells is explained
    min_cells: int = 2             # ... and at least this many compared cells are not explained
    area_power: float = 0.2        # segments ranked by residual contrast x area fraction ** this


@dataclass
class Explanation:
    """How well the hits explain the query: per query cell, the explained similarity (NaN: not compared),
    the fraction of compared cells explained, and the alignments' inlier counts."""

    similarity: np.ndarray         # float [gh, gw]
    fraction: float
    inliers: list[int]
    transforms: list[np.ndarray | None] = field(default_factory=list)   # per hit: query px -> hit px

    def unexplained(self, config: "ResidualConfig") -> int:
        """How many compared cells are not explained (similarity below ``config.explained_sim``)."""
        compared = ~np.isnan(self.similarity)
        return int((self.similarity[compared] < config.explained_sim).sum())

    def residual_cells(self) -> np.ndarray:
        """``1 - explained similarity`` per query cell, clipped to [0, 1]; 0 where not compared."""
        return np.where(np.isnan(self.similarity), 0.0, np.clip(1.0 - np.nan_to_num(self.similarity), 0.0, 1.0))


def align(query: CanvasTokens, hit: CanvasTokens, config: ResidualConfig = ResidualConfig()
          ) -> tuple[np.ndarray | None, int]:
    """The affine map from query pixels to the hit's pixels, ``A [2, 3]`` (None when fewer than
    ``min_inliers`` matches, or ``min_inlier_ratio`` of them, agree), and its inlier count."""
    from retrieval.rerank.verify import mutual_nearest_neighbors, ransac_affine

    qi, hi = query.inside().ravel(), hit.inside().ravel()
    qt, ht = query.tokens.reshape(-1, query.tokens.shape[2]), hit.tokens.reshape(-1, hit.tokens.shape[2])
    q_idx, h_idx = np.flatnonzero(qi), np.flatnonzero(hi)
    if len(q_idx) < 3 or len(h_idx) < 3:
        return None, 0
    matches, _ = mutual_nearest_neighbors(qt[q_idx] @ ht[h_idx].T)
    if len(matches) < max(3, config.min_inliers):
        return None, 0
    src = query.centres().reshape(-1, 2)[q_idx[matches[:, 0]]] / hit.cell     # in hit cells
    dst = hit.centres().reshape(-1, 2)[h_idx[matches[:, 1]]] / hit.cell
    transform, mask = ransac_affine(src, dst, threshold=config.ransac_threshold, max_scale=4.0, max_aspect=2.0)
    n = int(mask.sum())
    if transform is None or n < max(config.min_inliers, config.min_inlier_ratio * len(matches)):
        return None, n
    scaled = transform.copy()
    scaled[:, 2] *= hit.cell                   # cells -> pixels (the linear part is unit-free)
    return scaled, n


def explained_similarity(query: CanvasTokens, hit: CanvasTokens, transform: np.ndarray, radius: float
                         ) -> np.ndarray:
    """Per query cell: the best cosine between its token and the hit's tokens within ``radius`` cells of
    where ``transform`` sends its centre; NaN for padding cells and cells landing outside the hit."""
    gh, gw = query.grid
    qc = query.centres().reshape(-1, 2)
    land = qc @ transform[:, :2].T + transform[:, 2]                           # [q, 2] hit pixels
    w, h = hit.size
    on_hit = (land[:, 0] >= 0) & (land[:, 0] < w) & (land[:, 1] >= 0) & (land[:, 1] < h)
    ok = query.inside().ravel() & on_hit
    hc = hit.centres().reshape(-1, 2)
    h_in = hit.inside().ravel()
    near = (np.abs(land[:, None, :] - hc[None, :, :]) <= (radius + 0.5) * hit.cell).all(axis=2) & h_in[None, :]
    sims = query.tokens.reshape(gh * gw, -1) @ hit.tokens.reshape(-1, hit.tokens.shape[2]).T
    best = np.where(near, sims, -np.inf).max(axis=1)
    out = np.where(ok & np.isfinite(best), best, np.nan)
    return out.reshape(gh, gw).astype(np.float32)


def explain(query: CanvasTokens, hits: Sequence[CanvasTokens], config: ResidualConfig = ResidualConfig()
            ) -> Explanation | None:
    """How much of ``query`` the ``hits`` explain (module docstring); None when none of them aligns."""
    best = None
    inliers, transforms = [], []
    for hit in hits:
        transform, n = align(query, hit, config)
        inliers.append(n)
        transforms.append(transform)
        if transform is None:
            continue
        sim = explained_similarity(query, hit, transform, config.radius)
        best = sim if best is None else np.fmax(best, sim)
    if best is None:
        return None
    compared = ~np.isnan(best)
    fraction = float((best[compared] >= config.explained_sim).mean()) if compared.any() else 0.0
    return Explanation(best, fraction, inliers, transforms)

