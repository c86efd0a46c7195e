"""Selective search (van de Sande et al., 2011): hierarchical grouping of a superpixel segmentation.

A picture is over-segmented (``skimage.segmentation.felzenszwalb``); neighbouring segments are merged
greedily, the most similar pair first, until one region is left. Every region formed on the way (the
segments themselves included) is a candidate object: its box and its pixel mask. Similarity is the sum of

* **colour**: intersection of the two segments' colour histograms (``COLOUR_BINS`` per channel, L1-unit);
* **size**: ``1 - (a_i + a_j) / A``: small segments merge first, so regions grow evenly over the picture;
* **fill**: ``1 - (B_ij - a_i - a_j) / A`` with ``B_ij`` the area of the pair's joint box: segments that
  fill each other's box merge early (an object's parts before the object and its background).

Diversity (the paper's strategies): several segmentation scales and two colour spaces (RGB and HSV).

``selective_search(rgb)`` takes a uint8 ``[h, w, 3]`` array and returns ``[(box, mask)]``: boxes
(x0, y0, x1, y1) in pixels of the array (end exclusive) and boolean masks of the region's pixels; pure
array code (the segmentation comes from scikit-image).
"""

from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np
from scipy import ndimage

COLOUR_BINS = 25
SCALES = (60.0, 150.0)          # felzenszwalb's scale (larger: bigger segments), at ~128 px
MIN_SIZE_FRAC = 0.002           # segments smaller than this fraction of the picture are merged by felzenszwalb


def segment(rgb: np.ndarray, scale: float) -> np.ndarray:
    """Felzenszwalb's graph segmentation of ``rgb`` (uint8 [h, w, 3]) → int labels 0..n-1."""
    from skimage.segmentation import felzenszwalb

    h, w = rgb.shape[:2]
    labels = felzenszwalb(rgb, scale=scale, sigma=0.8, min_size=max(4, int(MIN_SIZE_FRAC * h * w)))
    return labels.astype(np.int32)          # already 0..n-1


def _histograms(channels: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Per segment: the L1-unit concatenation of a ``COLOUR_BINS``-bin histogram of each channel (uint8)."""
    flat = labels.ravel().astype(np.int64)
    out = np.zeros((n, channels.shape[2] * COLOUR_BINS), np.float64)
    for c in range(channels.shape[2]):
        bins = (channels[..., c].ravel().astype(np.int64) * COLOUR_BINS) // 256
        out[:, c * COLOUR_BINS:(c + 1) * COLOUR_BINS] = np.bincount(
            flat * COLOUR_BINS + bins, minlength=n * COLOUR_BINS).reshape(n, COLOUR_BINS)
    return out / np.maximum(out.sum(axis=1, keepdims=True), 1.0)


def _neighbours(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        diff = a != b
        lo = np.minimum(a[diff], b[diff])
        hi = np.maximum(a[diff], b[diff])
        pairs.update(zip(lo.tolist(), hi.tolist()))
    return pairs


def hierarchical_grouping(labels: np.ndarray, channels: np.ndarray
                          ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Every region of the merge hierarchy of ``labels`` (segments first, then each merge): ``[(box, segs)]``
    where ``segs`` is the boolean vector of the initial segments the region holds."""
    h, w = labels.shape
    n = int(labels.max()) + 1
    total = float(h * w)
    size = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    boxes = np.array([(sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
                      for sl in ndimage.find_objects(labels + 1)], np.float64)
    hist = _histograms(channels, labels, n)
    members = list(np.eye(n, dtype=bool))
    regions = {i: (size[i], boxes[i].copy(), hist[i]) for i in range(n)}
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in _neighbours(labels):
        neighbours[a].add(b)
        neighbours[b].add(a)

    def similarity(i: int, j: int) -> float:
        si, bi, hi = regions[i]
        sj, bj, hj = regions[j]
        joint = (max(bi[2], bj[2]) - min(bi[0], bj[0])) * (max(bi[3], bj[3]) - min(bi[1], bj[1]))
        return (float(np.minimum(hi, hj).sum()) + 1.0 - (si + sj) / total + 1.0 - (joint - si - sj) / total)

    heap = [(-similarity(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    out = [(tuple(int(v) for v in boxes[i]), members[i]) for i in range(n)]
    nxt = n
    while heap:
        _, i, j = heapq.heappop(heap)
        if i not in regions or j not in regions:       # a stale pair: one of them was merged already
            continue
        si, bi, hi = regions.pop(i)
        sj, bj, hj = regions.pop(j)
        s = si + sj
        box = np.array([min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])])
        regions[nxt] = (s, box, (hi * si + hj * sj) / s)
        members.append(members[i] | members[j])
        out.append((tuple(int(v) for v in box), members[-1]))
        joined = (neighbours.pop(i) | neighbours.pop(j)) - {i, j}
        neighbours[nxt] = joined
        for m in joined:
            neighbours[m] -= {i, j}
            neighbours[m].add(nxt)
            heapq.heappush(heap, (-similarity(m, nxt), m, nxt))
        nxt += 1
    return out


def selective_search(rgb: np.ndarray, scales: Sequence[float] = SCALES
                     ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    """Candidate object regions of ``rgb`` (uint8 [h, w, 3]): ``[(box, mask)]`` from every segmentation
    scale and colour space, duplicates (same box) dropped."""
    from skimage.color import rgb2hsv

    hsv = (rgb2hsv(rgb) * 255).astype(np.uint8)
    seen: set[tuple[int, int, int, int]] = set()
    out = []
    for scale in scales:
        for channels in (rgb, hsv):
            labels = segment(channels, scale)
            for box, segs in hierarchical_grouping(labels, channels):
                if box in seen:
                    continue
                seen.add(box)
                out.append((box, segs[labels]))
    return out
