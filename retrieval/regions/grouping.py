"""Selective search (van de Sande et al., 2011): hierarchical grouping of a superpixel segmentation.

A picture is over-segmented (``skimage.segmentation.felzenszwalb``); neighbouring segments are merged
greedily, the most similar pair first, until one region is left. Every region formed on the way (the
segments themselves included) is a candidate object: its box and its pixel mask. Similarity is the sum of

* **colour**: intersection of the two segments' colour histograms (``COLOUR_BINS`` per channel, L1-unit);
* **size**: ``1 - (a_i + a_j) / A``: small segments merge first, so regions grow evenly over the picture;
* **fill**: ``1 - (B_ij - a_i - a_j) / A`` with ``B_ij`` the area of the pair's joint box: segments that
  fill each other's box merge early (an object's parts before the object and its background).

Diversity (the paper's strategies): several segmentation scales and two colour spaces (RGB and HSV).

``selective_search(rgb)`` takes a uint8 ``[h, w, 3]`` array and returns the ``Regions``: boxes (x0, y0,
x1, y1) in pixels of the array (end exclusive), each region's initial segments, and sums of a map over each
region's pixels for all regions at once (iterating gives ``(box, mask)`` pairs); pure array code (the
segmentation comes from scikit-image).
"""

from __future__ import annotations

import heapq
import threading
from typing import Callable, Sequence

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


class Regions:
    """Selective search's regions of one picture, without a mask per region: region ``i`` is the union of
    the initial segments ``members[i]`` of the segmentation ``labels[which[i]]``. Sums over a region's pixels
    come from per-segment sums (``pixel_sums``: one ``bincount`` and one matrix product for all regions)."""

    def __init__(self, labels: list[np.ndarray], which: np.ndarray, members: list[np.ndarray], boxes: np.ndarray):
        self.labels = labels                                   # per segmentation: int [h, w]
        self.which = np.asarray(which, np.int64)               # [R]: the segmentation of each region
        self.members = members                                 # [R] bool vectors over that segmentation's segments
        self.boxes = np.asarray(boxes, np.int64).reshape(-1, 4)   # [R, 4] (x0, y0, x1, y1), end exclusive

    def __len__(self) -> int:
        return len(self.which)

    def box(self, i: int) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self.boxes[i])

    def mask(self, i: int) -> np.ndarray:
        return self.members[i][self.labels[self.which[i]]]

    def __iter__(self):
        """``(box, mask)`` per region (masks made one by one; ``pixel_sums`` needs none)."""
        return ((self.box(i), self.mask(i)) for i in range(len(self)))

    def pixel_sums(self, values: np.ndarray | None = None) -> np.ndarray:
        """float64 ``[R]``: per region, the sum of ``values`` (a ``[h, w]`` map) over its pixels (None: its
        pixel count)."""
        out = np.zeros(len(self), np.float64)
        for s, labels in enumerate(self.labels):
            rows = np.flatnonzero(self.which == s)
            if not len(rows):
                continue
            n = int(labels.max()) + 1
            per_segment = np.bincount(labels.ravel(), weights=None if values is None else
                                      np.asarray(values, np.float64).ravel(), minlength=n)
            out[rows] = np.stack([self.members[i] for i in rows]).astype(np.float64) @ per_segment
        return out

    def subset(self, keep) -> "Regions":
        keep = np.asarray(keep, np.int64).reshape(-1)
        return Regions(self.labels, self.which[keep], [self.members[i] for i in keep], self.boxes[keep])


def segmentation_jobs(rgb: np.ndarray, scales: Sequence[float] = SCALES) -> list[Callable[[], tuple]]:
    """One call per segmentation of ``rgb`` (uint8 [h, w, 3]): every scale in RGB and in HSV, each returning
    ``(labels, hierarchical_grouping(labels, channels))``; independent of each other, so a caller can run
    them in threads or beside other work (scikit-image's Felzenszwalb releases the GIL in its inner loop).
    ``collect_regions`` of their results, in this order, is ``selective_search(rgb, scales)``."""
    def job(scale: float, space: str):
        def run():
            channels = rgb if space == "rgb" else _hsv(rgb)
            labels = segment(channels, scale)
            return labels, hierarchical_grouping(labels, channels)
        return run

    return [job(scale, space) for scale in scales for space in ("rgb", "hsv")]


def _hsv(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2hsv

    return (rgb2hsv(rgb) * 255).astype(np.uint8)


def collect_regions(done: Sequence[tuple]) -> Regions:
    """The ``Regions`` of the segmentations ``done`` (``segmentation_jobs``' results, in order), duplicates
    (same box) dropped: the first segmentation that formed a box keeps it."""
    seen: set[tuple[int, int, int, int]] = set()
    labels_all, which, members, boxes = [], [], [], []
    for labels, regions in done:
        labels_all.append(labels)
        for box, segs in regions:
            if box in seen:
                continue
            seen.add(box)
            which.append(len(labels_all) - 1)
            members.append(segs)
            boxes.append(box)
    return Regions(labels_all, np.asarray(which, np.int64), members, np.asarray(boxes, np.int64))


def selective_search(rgb: np.ndarray, scales: Sequence[float] = SCALES, *, workers: int = 1) -> Regions:
    """Candidate object regions of ``rgb`` (uint8 [h, w, 3]) from every segmentation scale and colour
    space, duplicates (same box) dropped; iterating gives ``(box, mask)`` pairs. ``workers`` > 1: the
    segmentations run in threads; same result."""
    jobs = segmentation_jobs(rgb, scales)
    done = list(_pool().map(lambda run: run(), jobs)) if workers > 1 and len(jobs) > 1 else [run() for run in jobs]
    return collect_regions(done)


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    """The threads segmentations run in (shared by all queries; created on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loupe-segment")
        return _POOL
