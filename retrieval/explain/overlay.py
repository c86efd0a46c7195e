"""Rendering heatmaps: a colormap blended on the original image (PNG bytes), and heatmap JSON.

Pure array functions (``colorize``, ``blend``, ``heatmap_json``) plus ``overlay_png`` that encodes.
The colormaps are built in (no matplotlib): ``turbo`` (Google's polynomial approximation of Turbo,
Mikhailov 2019) and ``jet``.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

__all__ = ["colormap_lut", "colorize", "blend", "overlay_image", "overlay_png", "heatmap_json", "COLORMAPS"]

COLORMAPS = ("turbo", "jet")


@lru_cache(maxsize=4)
def colormap_lut(name: str = "turbo") -> np.ndarray:
    """[256, 3] uint8 lookup table."""
    x = np.linspace(0.0, 1.0, 256)
    if name == "turbo":
        r = 0.13572138 + x * (4.61539260 + x * (-42.66032258 + x * (132.13108234 + x * (-152.94239396
                                                                                    + x * 59.28637943))))
        g = 0.09140261 + x * (2.19418839 + x * (4.84296658 + x * (-14.18503333 + x * (4.27729857 + x * 2.82956604))))
        b = 0.10667330 + x * (12.64194608 + x * (-60.58204836 + x * (110.36276771 + x * (-89.90310912
                                                                                     + x * 27.34824973))))
    elif name == "jet":
        r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
        g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
        b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    else:
        raise ValueError(f"unknown colormap {name!r}; use one of {', '.join(COLORMAPS)}")
    return (np.clip(np.stack([r, g, b], axis=1), 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize(heatmap: np.ndarray, colormap: str = "turbo") -> np.ndarray:
    """[H, W] values in [0, 1] → [H, W, 3] uint8."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    return colormap_lut(colormap)[(h * 255 + 0.5).astype(np.uint8)]


def _fit(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h = np.asarray(heatmap, np.float32)
    if h.shape != (size[1], size[0]):
        h = np.asarray(Image.fromarray(h, mode="F").resize(size, Image.BILINEAR), np.float32)
    return h


def blend(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "turbo") -> np.ndarray:
    """``(1 - a) * image + a * colormap(heat)`` with ``a = alpha * (0.3 + 0.7 * heat)`` (cold areas stay
    readable); image [H, W, 3] uint8, heatmap [H, W] in [0, 1] → uint8 [H, W, 3]."""
    img = np.asarray(image, np.float32)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    a = (alpha * (0.3 + 0.7 * heat))[..., None]
    out = (1.0 - a) * img + a * colorize(heat, colormap).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def overlay_image(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "turbo") -> Image.Image:
    """The overlay at the image's original size (the heatmap is resized if needed)."""
    rgb = np.asarray(image.convert("RGB"))
    return Image.fromarray(blend(rgb, _fit(heatmap, image.size), alpha, colormap))


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = "turbo") -> bytes:
    buf = io.BytesIO()
    overlay_image(image, heatmap, alpha, colormap).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def heatmap_json(heatmap: np.ndarray, *, max_side: int | None = None, decimals: int = 3) -> dict:
    """``{"width", "height", "heatmap": [[...] * width] * height}``; ``width``/``height`` are the map's
    (the image's size unless ``max_side`` shrinks it; then ``image_width``/``image_height`` say so)."""
    h = np.asarray(heatmap, np.float32)
    full_h, full_w = h.shape
    out: dict = {}
    if max_side and max(full_w, full_h) > max_side:
        scale = max_side / max(full_w, full_h)
        size = (max(1, round(full_w * scale)), max(1, round(full_h * scale)))
        h = np.asarray(Image.fromarray(h, mode="F").resize(size, Image.BILINEAR), np.float32)
        out = {"image_width": full_w, "image_height": full_h}
    return {"width": int(h.shape[1]), "height": int(h.shape[0]),
            "heatmap": np.round(np.clip(h, 0, 1).astype(np.float64), decimals).tolist(), **out}
