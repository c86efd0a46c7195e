"""Query regions for copy detection: where in a query image a copied picture may sit.

A copy is often not the whole query: a photo pasted into a screenshot, a meme template with a caption
bar, a picture letter-boxed or padded with a coloured border. A global descriptor of the whole query
then describes the wrong thing. The DISC21 winners and SSCD's evaluation handle this on the query side
by embedding a few regions of the query and keeping, for each reference, the best (normalised) score
over the regions. This module proposes those regions from the pixels alone (no model):

* **uniform-border trim** (:func:`trim_box`): rows and columns at the edges that are one flat colour
  (padding, borders, letter-boxing) are cut away;
* **content boxes** (:func:`content_boxes`): pixels that are *flat* (differ from their neighbours by
  at most ``flat_tol`` grey levels) and connected to the image border through flat pixels are the
  canvas (page background, panels, title bars). What remains is content; after a morphological opening
  (which drops thin lines, i.e. panel edges and text strokes) its connected components' bounding boxes
  are the regions where a picture may be embedded.

:func:`query_regions` combines them into a short, deduplicated list of boxes, the whole image first.
Boxes are ``(left, top, right, bottom)`` pixel coordinates of the original image (PIL's crop order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class RegionConfig:
    work_size: int = 256          # longest side of the working copy the proposals are computed on
    flat_tol: float = 6.0         # grey levels: a pixel is flat if no 4-neighbour differs by more
    trim_tol: float = 12.0        # grey levels: a border row/column is uniform if within this of its colour
    open_frac: float = 0.02       # opening size (fraction of the working long side): removes thin lines
    min_area: float = 0.003       # smallest content box kept (fraction of the image area)
    min_side: int = 24            # smallest content box side in original pixels
    max_regions: int = 4          # whole image included
    max_iou: float = 0.7          # a box overlapping an earlier region more than this is a duplicate
    max_cover: float = 0.8        # a box covering more than this fraction of the image adds nothing
    pad_frac: float = 0.0         # content boxes are grown by this fraction of their size on each side


DEFAULT_REGION_CONFIG = RegionConfig()


def _work_array(img, work_size: int) -> tuple[np.ndarray, float]:
    """float32 RGB array of the image shrunk to ``work_size`` (long side), and the scale back."""
    from PIL import Image

    rgb = img.convert("RGB")
    w, h = rgb.size
    s = min(1.0, work_size / max(w, h))
    if s < 1.0:
        rgb = rgb.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    return np.asarray(rgb, np.float32), s


def flat_mask(arr: np.ndarray, tol: float) -> np.ndarray:
    """True where a pixel differs from every 4-neighbour by at most ``tol`` (max over channels)."""
    h, w = arr.shape[:2]
    diff = np.zeros((h, w), np.float32)
    dv = np.abs(arr[1:] - arr[:-1]).max(axis=-1)
    dh = np.abs(arr[:, 1:] - arr[:, :-1]).max(axis=-1)
    diff[1:] = np.maximum(diff[1:], dv)
    diff[:-1] = np.maximum(diff[:-1], dv)
    diff[:, 1:] = np.maximum(diff[:, 1:], dh)
    diff[:, :-1] = np.maximum(diff[:, :-1], dh)
    return diff <= tol


def trim_box(arr: np.ndarray, tol: float) -> tuple[int, int, int, int]:
    """The box left after cutting uniform rows/columns off each edge (working-array coordinates).

    A row or column is uniform when every pixel lies within ``tol`` of its median colour and that
    colour is within ``tol`` of the edge's colour (so a border of one colour is cut, not the picture)."""
    h, w = arr.shape[:2]

    def uniform(line: np.ndarray, ref: np.ndarray) -> bool:
        med = np.median(line, axis=0)
        return bool(np.abs(line - med).max() <= tol and np.abs(med - ref).max() <= tol)

    top, bottom, left, right = 0, h, 0, w
    ref = np.median(arr[0], axis=0)
    while top < bottom - 1 and uniform(arr[top, left:right], ref):
        top += 1
    ref = np.median(arr[h - 1], axis=0)
    while bottom - 1 > top and uniform(arr[bottom - 1, left:right], ref):
        bottom -= 1
    ref = np.median(arr[top:bottom, 0], axis=0)
    while left < right - 1 and uniform(arr[top:bottom, left], ref):
        left += 1
    ref = np.median(arr[top:bottom, w - 1], axis=0)
    while right - 1 > left and uniform(arr[top:bottom, right - 1], ref):
        right -= 1
    return left, top, right, bottom


def content_boxes(arr: np.ndarray, config: RegionConfig = DEFAULT_REGION_CONFIG) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (working-array coordinates) of content that is not border-connected flat canvas,
    largest first."""
    from scipy import ndimage

    h, w = arr.shape[:2]
    flat = flat_mask(arr, config.flat_tol)
    labels, _ = ndimage.label(flat)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    canvas = np.isin(labels, edge)
    content = ~canvas
    size = max(3, int(round(config.open_frac * max(h, w))) | 1)
    content = ndimage.binary_opening(content, structure=np.ones((size, size), bool))
    labels, n = ndimage.label(content)
    if n == 0:
        return []
    boxes = []
    for sl in ndimage.find_objects(labels):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if y1 - y0 > 4 and x1 - x0 > 4:   # the canvas pixels next to the content are not flat either
            y0, y1, x0, x1 = y0 + 1, y1 - 1, x0 + 1, x1 - 1
        boxes.append((x0, y0, x1, y1))
    boxes.sort(key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
    return boxes


def box_iou(a: Box, b: Box) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def query_regions(img, config: RegionConfig = DEFAULT_REGION_CONFIG) -> list[Box]:
    """Boxes of ``img`` (PIL) to embed as query views, the whole image first; at most ``max_regions``."""
    w, h = img.size
    full: Box = (0, 0, w, h)
    if config.max_regions <= 1 or w < 2 * config.min_side or h < 2 * config.min_side:
        return [full]
    arr, s = _work_array(img, config.work_size)
    ah, aw = arr.shape[:2]

    def to_orig(b, pad: float = 0.0) -> Box:
        px, py = pad * (b[2] - b[0]), pad * (b[3] - b[1])
        x0 = max(0, int(np.floor((b[0] - px) / s)))
        y0 = max(0, int(np.floor((b[1] - py) / s)))
        x1 = min(w, int(np.ceil((b[2] + px) / s)))
        y1 = min(h, int(np.ceil((b[3] + py) / s)))
        return x0, y0, x1, y1

    proposals = [to_orig(trim_box(arr, config.trim_tol))]
    proposals += [to_orig(b, config.pad_frac) for b in content_boxes(arr, config)]
    out = [full]
    for b in proposals:
        bw, bh = b[2] - b[0], b[3] - b[1]
        if bw < config.min_side or bh < config.min_side:
            continue
        area = bw * bh / float(w * h)
        if area < config.min_area or area > config.max_cover:
            continue
        if any(box_iou(b, o) > config.max_iou for o in out[1:]):
            continue
        out.append(b)
        if len(out) >= config.max_regions:
            break
    return out


__all__ = ["Box", "RegionConfig", "DEFAULT_REGION_CONFIG", "query_regions", "content_boxes", "trim_box",
           "flat_mask", "box_iou"]
