"""Query regions for re-ranking (pure array functions): multi-region query descriptors pooled over
windows of the query's own feature grid, and the query-crop second pass's choice of windows and their
mapping back to pixels of the query image through the encoder's own preprocessing.
Used by ``retrieval.rerank`` (see its docstring for how the scores are fused).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from retrieval.numeric import l2_normalize


# -- multi-region query descriptors --------------------------------------------------------------
def region_windows(grid: Sequence[int], sizes: Sequence[int] = (3, 4, 5), stride: int = 1) -> np.ndarray:
    """Square windows on an ``(h, w)`` grid: int [R, 4] rows of (row0, col0, row1, col1), end exclusive.

    For each side ``s`` in ``sizes`` (clipped to the grid), every window position on a ``stride`` lattice,
    plus the last position in each direction so that the windows cover the grid's far edges."""
    h, w = int(grid[0]), int(grid[1])
    out: list[tuple[int, int, int, int]] = []
    for size in sizes:
        sh, sw = min(int(size), h), min(int(size), w)
        rows = sorted(set(range(0, h - sh + 1, max(1, stride))) | {h - sh})
        cols = sorted(set(range(0, w - sw + 1, max(1, stride))) | {w - sw})
        out += [(r, c, r + sh, c + sw) for r in rows for c in cols]
    return np.array(sorted(set(out)), np.int64).reshape(-1, 4)


def region_vectors(tokens: np.ndarray, grid: Sequence[int], windows: np.ndarray) -> np.ndarray:
    """Unit regional descriptors [R, C]: the mean of the (row-major) grid tokens inside each window,
    L2-normalised — the encoder's own global pooling applied to a sub-window of the query."""
    h, w = int(grid[0]), int(grid[1])
    t = np.asarray(tokens, np.float32).reshape(h, w, -1)
    integral = np.zeros((h + 1, w + 1, t.shape[2]), np.float64)
    integral[1:, 1:] = t.cumsum(0).cumsum(1)
    r0, c0, r1, c1 = (np.asarray(windows)[:, i] for i in range(4))
    sums = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    return l2_normalize((sums / ((r1 - r0) * (c1 - c0))[:, None]).astype(np.float32))


def region_scores(regions: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Per candidate vector: its best cosine over the query's regional descriptors (max-pooled)."""
    v = np.asarray(vectors, np.float32)
    if len(regions) == 0 or len(v) == 0:
        return np.zeros(len(v), np.float64)
    # one small product per candidate (batched matmul): stays single-threaded, unlike one larger product
    sims = np.matmul(v[:, None, :], np.asarray(regions, np.float32).T[None])[:, 0, :]
    return sims.max(axis=1).astype(np.float64)


# -- query-crop second pass ----------------------------------------------------------------------
def crop_windows(windows: np.ndarray, regions: np.ndarray, vectors: np.ndarray, global_scores: np.ndarray,
                 query_vector: np.ndarray | None = None, count: int = 1, select: str = "gain",
                 max_overlap: float = 0.5) -> np.ndarray:
    """Indices of the ``count`` query windows to crop (best first; a window overlapping a chosen one by
    more than ``max_overlap`` IoU is skipped).

    ``gain``: per window, ``max_c (region_w · v_c - global_c)`` — the window that finds some candidate
    better than the whole query does (an object pasted on a picture that is itself indexed: the background
    windows match the background image about as well as the global vector, the object's window gains on
    the object's original). ``match``: ``max_c region_w · v_c``. ``novel``: the lowest ``region_w · q``."""
    regions = np.asarray(regions, np.float32)
    if len(regions) == 0 or count <= 0:
        return np.zeros(0, np.int64)
    if select == "novel":
        if query_vector is None:
            raise ValueError("crop_select='novel' needs the query vector")
        score = -(regions @ np.asarray(query_vector, np.float32))
    else:
        v = np.asarray(vectors, np.float32)
        if len(v) == 0:
            return np.zeros(0, np.int64)
        sims = np.matmul(v[:, None, :], regions.T[None])[:, 0, :].astype(np.float64)    # [n, R]
        if select == "gain":
            sims = sims - np.asarray(global_scores, np.float64)[:, None]
        elif select != "match":
            raise ValueError(f"unknown crop_select {select!r}")
        score = sims.max(axis=0)
    w = np.asarray(windows, np.float64)
    area = (w[:, 2] - w[:, 0]) * (w[:, 3] - w[:, 1])
    chosen: list[int] = []
    for i in np.argsort(-score, kind="stable"):
        ok = True
        for j in chosen:
            ih = max(0.0, min(w[i, 2], w[j, 2]) - max(w[i, 0], w[j, 0]))
            iw = max(0.0, min(w[i, 3], w[j, 3]) - max(w[i, 1], w[j, 1]))
            inter = ih * iw
            if inter / (area[i] + area[j] - inter) > max_overlap:
                ok = False
                break
        if ok:
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return np.array(chosen, np.int64)


def encoder_view(spec, size: Sequence[int]) -> tuple[float, float, float, float]:
    """The pixel box ``(x0, y0, x1, y1)`` of an image of ``size = (w, h)`` that the encoder's preprocessing
    keeps (its feature grid covers exactly this box): a centred square of ``crop_pct × the shorter side``
    for timm-style transforms (effnet, ConSE), ``image_size / resize`` of it for DINOv2, the whole shorter
    side for CLIP; the whole image for encoders that resize without cropping (SSCD, PDQ)."""
    w, h = float(size[0]), float(size[1])
    get = getattr(spec, "get", lambda key, default=None: default)
    family = getattr(spec, "family", None)
    frac = get("crop_pct")
    if frac is None and family == "dinov2":
        frac = float(getattr(spec, "image_size", 224)) / float(get("resize", 256))
    if frac is None and family == "clip":
        frac = 1.0
    if frac is None:
        return 0.0, 0.0, w, h
    side = min(w, h) * float(frac)
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def grid_box_to_pixels(box: Sequence[int], grid: Sequence[int], size: Sequence[int],
                       view: Sequence[float] | None = None, margin: float = 0.0) -> tuple[int, int, int, int]:
    """A window of grid cells ``(row0, col0, row1, col1)`` (end exclusive) → the pixel box
    ``(x0, y0, x1, y1)`` of the original image of ``size = (w, h)`` it covers, given the encoder's ``view``
    box (default: the whole image), grown by ``margin`` cells on every side and clipped to the image."""
    w, h = int(size[0]), int(size[1])
    vx0, vy0, vx1, vy1 = view if view is not None else (0.0, 0.0, float(w), float(h))
    gh, gw = int(grid[0]), int(grid[1])
    ch, cw = (vy1 - vy0) / gh, (vx1 - vx0) / gw
    r0, c0, r1, c1 = (float(x) for x in box)
    x0 = vx0 + (c0 - margin) * cw
    x1 = vx0 + (c1 + margin) * cw
    y0 = vy0 + (r0 - margin) * ch
    y1 = vy0 + (r1 + margin) * ch
    x0, y0 = max(0, int(np.floor(x0 + 1e-6))), max(0, int(np.floor(y0 + 1e-6)))
    x1, y1 = min(w, int(np.ceil(x1 - 1e-6))), min(h, int(np.ceil(y1 - 1e-6)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)
