"""Rendering heatmaps a person can read: a perceptual colour map blended on the original image, the
top regions outlined, what the encoder did not see hatched, an optional legend (PNG bytes); heatmap JSON.

Pure array functions (``colorize``, ``blend``, ``contour_mask``, ``hatch``, ``heatmap_json``) plus
``overlay_image`` / ``overlay_png`` that draw and encode. The colour maps are built in (no matplotlib):
``inferno`` and ``viridis`` (perceptually uniform, colour-blind safe; degree-6 polynomial fits of
matplotlib's tables by Matt Zucker; within about 5 of 255 levels of matplotlib's values at 0, ¼, ½, ¾, 1),
``turbo`` (Google's polynomial approximation, Mikhailov 2019) and ``jet``. ``inferno`` is the default:
its lightness rises monotonically, so "brighter = more" reads the same in grey and for colour-blind
readers, and its dark low end dims the unattributed parts instead of painting them blue.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from .grid import seen_mask

__all__ = ["colormap_lut", "colorize", "blend", "overlay_image", "overlay_png", "heatmap_json", "COLORMAPS",
           "DEFAULT_COLORMAP", "TOP_FRACTION", "contour_mask", "hatch", "top_threshold", "display_scale",
           "overlay_array", "png_bytes"]

COLORMAPS = ("inferno", "viridis", "turbo", "jet")
DEFAULT_COLORMAP = "inferno"
TOP_FRACTION = 0.2          # the outline: the top 20 % of the seen area (what the deletion test removes)
HATCH_GREY = (128, 128, 128)

_POLY = {   # c0..c6 per channel (r, g, b): value(t) = sum c_k t^k
    "inferno": ((0.0002189403691192265, 0.1065134194856116, 11.60249308247187, -41.70399613139459,
                 77.162935699427, -71.31942824499214, 25.13112622477341),
                (0.001651004631001012, 0.5639564367884091, -3.972853965665698, 17.43639888205313,
                 -33.40235894210092, 32.62606426397723, -12.24266895238567),
                (-0.01948089843709184, 3.932712388889277, -15.9423941062914, 44.35414519872813,
                 -81.80730925738993, 73.20951985803202, -23.07032500287172)),
    "viridis": ((0.2777273272234177, 0.1050930431085774, -0.3308618287255563, -4.634230498983486,
                 6.228269936347081, 4.776384997670288, -5.435455855934631),
                (0.005407344544966578, 1.404613529898575, 0.214847559468213, -5.799100973351585,
                 14.17993336680509, -13.74514537774601, 4.645852612178535),
                (0.3340998053353061, 1.384590162594685, 0.09509516302823659, -19.33244095627987,
                 56.69055260068105, -65.35303263337234, 26.3124352495832)),
    "turbo": ((0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943, 0.0),
              (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604, 0.0),
              (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973, 0.0)),
}


@lru_cache(maxsize=8)
def colormap_lut(name: str = DEFAULT_COLORMAP) -> np.ndarray:
    """[256, 3] uint8 lookup table."""
    x = np.linspace(0.0, 1.0, 256)
    if name in _POLY:
        rgb = [sum(c * x ** k for k, c in enumerate(coeffs)) for coeffs in _POLY[name]]
    elif name == "jet":
        rgb = [np.clip(1.5 - np.abs(4 * x - k), 0, 1) for k in (3, 2, 1)]
    else:
        raise ValueError(f"unknown colormap {name!r}; use one of {', '.join(COLORMAPS)}")
    return (np.clip(np.stack(rgb, axis=1), 0, 1) * 255 + 0.5).astype(np.uint8)


def colorize(heatmap: np.ndarray, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """[H, W] values in [0, 1] → [H, W, 3] uint8."""
    h = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    return colormap_lut(colormap)[(h * 255 + 0.5).astype(np.uint8)]


def _fit(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h = np.asarray(heatmap, np.float32)
    if h.shape != (size[1], size[0]):
        h = np.asarray(Image.fromarray(h, mode="F").resize(size, Image.BILINEAR), np.float32)
    return h


def blend(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """``(1 - a) * image + a * colormap(heat)`` with ``a = alpha * (0.45 + 0.75 * heat)``: cold parts are
    only dimmed (inferno's low end is dark), hot parts tinted, and the picture stays visible everywhere
    (at most ``1.2 * alpha`` of it is covered); image [H, W, 3] uint8, heatmap [H, W] in [0, 1] → uint8."""
    img = np.asarray(image, np.float32)
    heat = np.clip(np.nan_to_num(np.asarray(heatmap, np.float32)), 0.0, 1.0)
    a = np.clip(alpha * (0.45 + 0.75 * heat), 0.0, 1.0)[..., None]
    out = (1.0 - a) * img + a * colorize(heat, colormap).astype(np.float32)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def display_scale(heat: np.ndarray, seen: np.ndarray | None = None, q: float = 0.99) -> np.ndarray:
    """The map as shown: divided by its ``q`` quantile over the seen area (not its single brightest pixel,
    which would leave a smooth map mostly dark), clipped to [0, 1]."""
    h = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0.0, None)
    vals = h[seen] if seen is not None else h.ravel()
    top = float(np.quantile(vals, q)) if vals.size else 0.0
    if top <= 0:
        top = float(h.max())
    return np.clip(h / top, 0.0, 1.0) if top > 0 else h


def top_threshold(heat: np.ndarray, seen: np.ndarray | None = None, fraction: float = TOP_FRACTION) -> float:
    """The heat above which lie the top ``fraction`` of the seen pixels (``inf`` for an empty map)."""
    h = np.asarray(heat, np.float32)
    vals = h[seen] if seen is not None else h.ravel()
    if vals.size == 0 or float(vals.max()) <= 0:
        return float("inf")
    return max(float(np.quantile(vals, 1.0 - fraction)), 1e-6)


def contour_mask(region: np.ndarray, width: int = 1) -> np.ndarray:
    """bool [H, W]: the inner border (``width`` px) of a bool region."""
    from scipy.ndimage import binary_erosion

    region = np.asarray(region, bool)
    if not region.any():
        return region
    inner = binary_erosion(region, iterations=max(1, int(width)), border_value=1)
    return region & ~inner


def hatch(shape: tuple[int, int], spacing: int = 8, width: int = 2) -> np.ndarray:
    """bool [H, W]: diagonal stripes (``/``), ``width`` px every ``spacing`` px."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return (xx + yy) % max(2, int(spacing)) < max(1, int(width))


def _line_width(size: tuple[int, int]) -> int:
    return max(1, int(round(min(size) / 180)))


def _drop_specks(region: np.ndarray, min_area: int) -> np.ndarray:
    """The region without its connected parts smaller than ``min_area`` px (the outline stays readable)."""
    from scipy.ndimage import label

    lab, n = label(region)
    if n <= 1:
        return region
    sizes = np.bincount(lab.ravel())
    keep = sizes >= min_area
    keep[0] = False
    if not keep.any():
        keep[int(np.argmax(sizes[1:])) + 1] = True
    return keep[lab]


def overlay_array(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP, *,
                  box=None, contours: bool = True) -> np.ndarray:
    """The overlay as uint8 [H, W, 3]: the blend (``display_scale``d); the top-``TOP_FRACTION`` region of
    the seen area outlined (white line, dark halo; parts under 1 % of the seen area left out); outside
    ``box`` (the encoder's crop) greyed and hatched."""
    h, w = heat.shape
    seen = seen_mask((w, h), box)
    out = blend(rgb, display_scale(heat, seen), alpha, colormap)
    lw = _line_width((w, h))
    if contours:
        thr = top_threshold(heat, seen)
        if np.isfinite(thr):
            from scipy.ndimage import binary_dilation

            region = _drop_specks((heat >= thr) & seen, max(4, int(0.01 * seen.sum())))
            edge = contour_mask(region, lw)
            halo = binary_dilation(edge, iterations=lw) & ~edge
            out[halo] = (out[halo] * 0.35).astype(np.uint8)
            out[edge] = 255
    if not seen.all():
        grey = np.asarray(rgb, np.float32).mean(axis=2, keepdims=True)
        washed = (0.45 * grey + 0.55 * 235.0).astype(np.uint8).repeat(3, axis=2)
        out[~seen] = washed[~seen]
        stripes = hatch((h, w), spacing=6 * lw + 4, width=lw) & ~seen
        out[stripes] = HATCH_GREY
    return out


def overlay_image(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP,
                  *, box=None, contours: bool = True, legend: bool = False, label: str | None = None,
                  note: str | None = None) -> Image.Image:
    """The overlay at the image's original size (the heatmap is resized if needed); with ``legend`` a
    legend band is added below (the canvas widened to at least ``legend.MIN_WIDTH`` if needed)."""
    rgb = np.asarray(image.convert("RGB"))
    out = Image.fromarray(overlay_array(rgb, _fit(heatmap, image.size), alpha, colormap, box=box, contours=contours))
    if not legend:
        return out
    from .legend import with_legend

    unseen = box is not None and not seen_mask(image.size, box).all()
    return with_legend(out, colormap=colormap, label=label, note=note, unseen=unseen, contours=contours)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP,
                **kwargs) -> bytes:
    """``overlay_image(...)`` as PNG bytes (keyword options: ``box``, ``contours``, ``legend``, ``label``, ``note``)."""
    return png_bytes(overlay_image(image, heatmap, alpha, colormap, **kwargs))


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
