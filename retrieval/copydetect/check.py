"""Copy-specific checks of a candidate pair of images, from their pixels: is one a resized, re-encoded
or cropped copy of the other?

A general-purpose encoder (effnet-lite0, CLIP) scores a copy resized to 70 % and saved as JPEG
quality 60 about as high as a different picture that looks alike (both ~0.85-0.90), so no cosine
threshold separates them. ``loupe dedup`` therefore takes candidates from the index's vectors at a
loose threshold and decides with these checks, which compare the pixels themselves:

* :func:`pdq_similarity`: Meta's PDQ hash (``pdqhash``, the ``pdq`` extra), ``1 - 2 h / 256`` for a
  Hamming distance ``h``. Robust to resizing and re-encoding, not to cropping.
* :func:`aligned_correlation`: the best Pearson correlation of small RGB thumbnails of the two
  images, one placed inside the other at every scale in ``[min_scale, 1]`` (of the container's width)
  and every offset: a crop keeping 60-100 % of each side, resized and re-encoded, lines up with its
  original and correlates near 1; a different picture of a similar thing does not line up pixel for
  pixel. Coarse-to-fine (32 then 64 pixels), a few milliseconds a pair, numpy only.

Pure functions over PIL images and arrays; :class:`PixelCache` keeps each image's thumbnails and hash
(the images come from the index's source files, read by the caller).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

COARSE_SIDE = 32
FINE_SIDE = 64
BLUR = 1.0              # Gaussian blur (pixels at 64) so that sub-pixel misalignment and JPEG noise matter less
MIN_SCALE = 0.6          # a crop keeping less than 60 % of the width is not looked for


def thumbnail(img, side: int):
    """An RGB PIL image with its longer side ``side`` pixels (aspect kept)."""
    from PIL import Image

    im = img if img.mode == "RGB" else img.convert("RGB")
    w, h = im.size
    s = side / max(w, h)
    size = (max(4, round(w * s)), max(4, round(h * s)))
    return im.resize(size, Image.Resampling.BOX if s < 1 else Image.Resampling.BILINEAR)


def _pixels(img) -> np.ndarray:
    return np.asarray(img, np.float32)


def _window_correlation(container: np.ndarray, template: np.ndarray,
                        offsets: list[tuple[int, int]] | None = None) -> tuple[float, tuple[int, int]]:
    """Best Pearson correlation of ``template`` with a same-size window of ``container`` (all offsets,
    or the given ``(y, x)`` ones) and where it is."""
    th, tw = template.shape[:2]
    t = template - template.mean()
    tn = float(np.sqrt((t * t).sum()))
    if tn < 1e-3 * t.size:           # a flat template lines up with anything flat: no evidence
        return 0.0, (0, 0)
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(container, (th, tw, 3))[:, :, 0]      # [oy, ox, th, tw, 3]
    if offsets is not None:
        oy, ox = win.shape[:2]
        offsets = [(y, x) for y, x in offsets if 0 <= y < oy and 0 <= x < ox]
        if not offsets:
            return -1.0, (0, 0)
        ys, xs = np.asarray(offsets).T
        win = win[ys, xs][:, None]                                   # [n, 1, th, tw, 3]
    n = th * tw * 3
    flat = win.reshape(win.shape[0], win.shape[1], n)
    s = flat.sum(axis=2)
    s2 = np.einsum("yxn,yxn->yx", flat, flat)
    cross = np.einsum("yxn,n->yx", flat, t.reshape(n))
    var = np.maximum(s2 - s * s / n, 0.0)
    r = cross / (np.sqrt(var) * tn + 1e-6)
    r = np.where(var > (1e-3 * n) ** 2 / n, r, 0.0)
    best = np.unravel_index(int(np.argmax(r)), r.shape)
    if offsets is not None:
        return float(r[best]), tuple(int(v) for v in offsets[best[0]])
    return float(r[best]), (int(best[0]), int(best[1]))


def _inside(container: np.ndarray, content, scales, offsets_for=None):
    """Best (correlation, scale, (y, x)) of ``content`` (a PIL image) resized to ``scale`` x the
    container's width, over the container's windows."""
    from PIL import Image

    ch, cw = container.shape[:2]
    aw, ah = content.size
    best = (-1.0, 1.0, (0, 0))
    for scale in scales:
        tw = max(4, round(scale * cw))
        th = max(4, round(tw * ah / aw))
        if th > ch:
            if th - ch > 1:
                continue
            th = ch
        if tw > cw:
            continue
        offsets = offsets_for(scale) if offsets_for else None
        template = _pixels(content.resize((tw, th), Image.Resampling.BILINEAR))
        r, at = _window_correlation(container, template, offsets)
        if r > best[0]:
            best = (r, float(scale), at)
    return best


@dataclass
class Thumbs:
    """An image's thumbnails for :func:`aligned_correlation`: pixels at 32 and 64 pixels (containers)
    and the 64-pixel image (templates are resized from it)."""

    coarse: np.ndarray
    fine: np.ndarray
    image: Any
    side: int = FINE_SIDE          # the picture's own longer side, pixels

    @classmethod
    def of(cls, img) -> "Thumbs":
        from PIL import ImageFilter

        fine = thumbnail(img, FINE_SIDE)
        coarse = thumbnail(img, COARSE_SIDE)
        if BLUR:
            fine = fine.filter(ImageFilter.GaussianBlur(BLUR))
            coarse = coarse.filter(ImageFilter.GaussianBlur(BLUR / 2))
        return cls(_pixels(coarse), _pixels(fine), fine, max(img.size))


def aligned_correlation(a: Any, b: Any, *, min_scale: float = MIN_SCALE) -> float:
    """How well one image lines up, pixel for pixel, with the other or a part of it (Pearson correlation
    of RGB thumbnails, best over scales ``[min_scale, 1]`` and offsets, either image as the container).
    ``a``/``b``: PIL images or :class:`Thumbs`. ~1 for a resized / re-encoded / cropped copy."""
    ta = a if isinstance(a, Thumbs) else Thumbs.of(a)
    tb = b if isinstance(b, Thumbs) else Thumbs.of(b)
    coarse_scales = np.arange(1.0, min_scale - 1e-6, -0.05)
    best = -1.0
    for container, content in ((ta, tb), (tb, ta)):
        r, scale, (y, x) = _inside(container.coarse, content.image, coarse_scales)
        if r < 0.5:                    # nothing lines up even roughly: no need to refine
            best = max(best, r)
            continue
        k = container.fine.shape[1] / container.coarse.shape[1]
        fine_scales = [s for s in np.arange(scale - 0.05, scale + 0.0501, 0.0125) if min_scale - 1e-6 <= s <= 1.0]

        def around(_s, y=y, x=x, k=k):
            cy, cx = round(y * k), round(x * k)
            return [(cy + dy, cx + dx) for dy in range(-3, 4) for dx in range(-3, 4)]

        rf, _, _ = _inside(container.fine, content.image, fine_scales, around)
        best = max(best, rf if rf >= 0 else r)
    return float(best)


def pdq_bits(img) -> np.ndarray | None:
    """PDQ's 256 bits of an image (bool [256]), or None without the ``pdq`` extra."""
    try:
        import pdqhash
    except ImportError:
        return None
    arr = np.ascontiguousarray(np.asarray(img.convert("RGB") if img.mode != "RGB" else img, np.uint8))
    return np.asarray(pdqhash.compute(arr)[0], bool)


def pdq_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - 2 h / 256`` of two PDQ bit vectors (the scale of ``loupe dedup --encoder pdq``)."""
    return 1.0 - 2.0 * float(np.count_nonzero(np.asarray(a) != np.asarray(b))) / len(a)


class PixelCache:
    """Thumbnails and PDQ bits per image id, computed once from ``load(id) -> PIL image`` (LRU of
    ``size`` entries, a few KB each). An image that cannot be read is remembered as None."""

    def __init__(self, load: Callable[[str], Any], size: int = 20000, pdq: bool = True):
        self.load, self.size, self.pdq = load, size, pdq
        self._items: OrderedDict[str, tuple[Thumbs, np.ndarray | None] | None] = OrderedDict()
        self.failed: list[str] = []

    def get(self, image_id: str) -> tuple[Thumbs, np.ndarray | None] | None:
        if image_id in self._items:
            self._items.move_to_end(image_id)
            return self._items[image_id]
        try:
            img = self.load(image_id)
            item = (Thumbs.of(img), pdq_bits(img) if self.pdq else None)
        except Exception:  # noqa: BLE001 - a file that moved or cannot be decoded: no pixel evidence
            self.failed.append(image_id)
            item = None
        self._items[image_id] = item
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return item


__all__ = ["aligned_correlation", "pdq_bits", "pdq_similarity", "thumbnail", "Thumbs", "PixelCache"]
