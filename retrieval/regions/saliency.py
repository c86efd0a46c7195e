"""Saliency maps of one picture, and the encoder's feature map of the whole picture.

* ``canvas_tokens``: the picture padded to the square the encoder's centre crop keeps whole
  (``retrieval.rerank.regions.encoder_view``), so the feature grid covers every pixel; one batched pass for
  several pictures (the query and the pictures that may explain it, ``residual.py``). The finer map is
  used when the encoder has one (effnet-lite0: 14x14 stage-4 cells, ``encode_images_and_fine``).
* ``feature_saliency``: a cell is salient when its token differs from the picture's mean token (``1 - cos``):
  an object stands out from the surroundings it was pasted on or photographed against.
* ``colour_saliency``: colour distinctness (Achanta et al., frequency-tuned saliency): the distance of the
  blurred picture's colours from the picture's mean colour and from its border's median colour.
* ``saliency_map``: both, each scaled to [0, 1], weighted, on a map whose longer side is ``WORK_SIDE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

WORK_SIDE = 128            # the saliency maps' longer side (pixels)


@dataclass
class CanvasTokens:
    """The feature map of a picture of ``size = (w, h)`` padded to a square canvas: ``tokens [gh, gw, C]``
    (unit rows); the grid covers a square of ``side`` picture pixels whose top-left corner is at picture
    coordinates ``origin`` (negative: padding)."""

    tokens: np.ndarray
    size: tuple[int, int]
    side: float
    origin: tuple[float, float]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])

    @property
    def cell(self) -> float:
        """A cell's side in picture pixels."""
        return self.side / self.grid[1]

    def centres(self) -> np.ndarray:
        """Cell centres in picture pixels: float [gh, gw, 2] of (x, y)."""
        gh, gw = self.grid
        xs = (np.arange(gw) + 0.5) * self.side / gw + self.origin[0]
        ys = (np.arange(gh) + 0.5) * self.side / gh + self.origin[1]
        return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=2)

    def inside(self) -> np.ndarray:
        """bool [gh, gw]: cells whose centre lies on the picture (not on the padding)."""
        c = self.centres()
        w, h = self.size
        return (c[..., 0] >= 0) & (c[..., 0] < w) & (c[..., 1] >= 0) & (c[..., 1] < h)

    def sample(self, cells: np.ndarray, out_shape: tuple[int, int]) -> np.ndarray:
        """A per-cell map ``[gh, gw]`` sampled at the pixels of an ``out_shape = (h, w)`` map of the picture
        (bilinear over cell centres)."""
        gh, gw = self.grid
        w, h = self.size
        oh, ow = out_shape
        py = (np.arange(oh) + 0.5) * h / oh
        px = (np.arange(ow) + 0.5) * w / ow
        gy = ((py - self.origin[1]) * gh / self.side - 0.5).clip(0, gh - 1)
        gx = ((px - self.origin[0]) * gw / self.side - 0.5).clip(0, gw - 1)
        return ndimage.map_coordinates(np.asarray(cells, np.float32), np.meshgrid(gy, gx, indexing="ij"),
                                       order=1, mode="nearest")


def canvas_tokens(encoder, images: Sequence[Image.Image]) -> list[CanvasTokens] | None:
    """The feature map of each picture padded (with its mean colour) to the square the encoder's centre
    crop keeps whole, in one batched pass; None when the encoder has no feature map."""
    from retrieval.errors import UnsupportedModalityError
    from retrieval.rerank.regions import encoder_view

    if encoder is None or not images:
        return None
    vx0, _, vx1, _ = encoder_view(getattr(encoder, "spec", None), (1000, 1000))
    frac = max((vx1 - vx0) / 1000.0, 1e-3)
    canvases, frames = [], []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        side = max(w, h)
        canvas_side = int(round(side / frac))
        mean = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
        canvas = Image.new("RGB", (canvas_side, canvas_side), mean)
        ox, oy = (canvas_side - w) // 2, (canvas_side - h) // 2
        canvas.paste(image, (ox, oy))
        canvases.append(canvas)
        c0 = (canvas_side - side) / 2.0      # the grid covers the view square [c0, c0 + side) of the canvas
        frames.append(((w, h), float(side), (c0 - ox, c0 - oy)))
    try:
        if "fine" in getattr(encoder, "local_layers", ()) and hasattr(encoder, "encode_fine"):
            tokens, grid = encoder.encode_fine(canvases)          # the fine map only (no global vector)
        elif "fine" in getattr(encoder, "local_layers", ()) and hasattr(encoder, "encode_images_and_fine"):
            _, _, _, tokens, grid = encoder.encode_images_and_fine(canvases)
        else:
            _, tokens, grid = encoder.encode_images_and_local(canvases)
    except UnsupportedModalityError:
        return None
    gh, gw = int(grid[0]), int(grid[1])
    return [CanvasTokens(np.asarray(t, np.float32).reshape(gh, gw, -1), size, side, origin)
            for t, (size, side, origin) in zip(tokens, frames)]


def feature_saliency(view: CanvasTokens | None, out_shape: tuple[int, int]) -> np.ndarray:
    """Per pixel of an ``out_shape = (h, w)`` map: how far its feature-map token is from the picture's mean
    token (``1 - cos``), in [0, 2]; zeros without a feature map."""
    if view is None:
        return np.zeros(out_shape, np.float32)
    inside = view.inside()
    if not inside.any():
        return np.zeros(out_shape, np.float32)
    t = view.tokens
    centre = t[inside].mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    norms = np.maximum(np.linalg.norm(t, axis=2), 1e-12)
    return view.sample(np.where(inside, 1.0 - (t @ centre) / norms, 0.0), out_shape)


def colour_saliency(image: Image.Image, out_shape: tuple[int, int]) -> np.ndarray:
    """Colour distinctness per pixel of an ``out_shape`` map: distance of the blurred colour from the mean
    colour and from the border's median colour (the larger), RGB scaled to [0, 1]."""
    small = np.asarray(image.convert("RGB").resize((out_shape[1], out_shape[0]), Image.BILINEAR), np.float32) / 255
    blurred = ndimage.gaussian_filter(small, sigma=(1.0, 1.0, 0))
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    d_mean = np.linalg.norm(blurred - small.reshape(-1, 3).mean(axis=0), axis=2)
    d_border = np.linalg.norm(blurred - np.median(border, axis=0), axis=2)
    return np.maximum(d_mean, d_border).astype(np.float32)


def unit_range(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo < 1e-6 else (a - lo) / (hi - lo)


def work_shape(size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of the maps of a picture of ``size = (w, h)``: the longer side ``WORK_SIDE``."""
    w, h = size
    scale = WORK_SIDE / max(w, h)
    return max(4, int(round(h * scale))), max(4, int(round(w * scale)))


def saliency_map(image: Image.Image, view: CanvasTokens | None, w_feature: float = 0.7, w_colour: float = 0.3
                 ) -> np.ndarray:
    """The combined saliency of ``image`` in [0, 1] on a map of ``work_shape(image.size)``; ``view``: its
    ``canvas_tokens`` (None: colour only)."""
    shape = work_shape(image.size)
    sal = w_colour * unit_range(colour_saliency(image, shape))
    if view is not None and w_feature > 0:
        sal = sal + w_feature * unit_range(feature_saliency(view, shape))
    return unit_range(sal)
