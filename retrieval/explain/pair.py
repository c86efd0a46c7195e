"""The pair view: the query image and the result side by side, each with its map, the locally matched
regions linked by lines, and one legend for both (``loupe explain --pair``, ``POST /api/attribution/pair``).
A text query has no query image: the view is the result's overlay with the legend (and the note)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .legend import BAND_BG, TEXT, font, legend_band
from .overlay import DEFAULT_COLORMAP, _fit, overlay_array, png_bytes

__all__ = ["pair_image", "pair_png", "LINE_COLOURS", "MAX_DRAWN"]

# Okabe–Ito: distinguishable for colour-blind readers, none of them the colour map's own hues at full
LINE_COLOURS = ((0, 158, 115), (86, 180, 233), (230, 159, 0), (240, 228, 66), (0, 114, 178), (213, 94, 0),
                (204, 121, 167))
MAX_DRAWN = 12      # lines drawn: the strongest matches; more turn into a tangle


def _panel(image: Image.Image, heat: np.ndarray, box, height: int, alpha: float, colormap: str):
    """(panel image scaled to ``height``, scale factor) with the overlay drawn at that size."""
    w, h = image.size
    scale = height / h
    if w * scale > 2 * height:                      # very wide pictures: cap the width
        scale = 2 * height / w
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = image.convert("RGB").resize(size, Image.BICUBIC)
    heat_small = np.clip(_fit(heat, size), 0.0, 1.0)
    sbox = tuple(v * scale for v in box) if box is not None else None
    arr = overlay_array(np.asarray(small), heat_small, alpha, colormap, box=sbox, contours=True)
    return Image.fromarray(arr), scale


def pair_image(ex, *, alpha: float = 0.5, colormap: str = DEFAULT_COLORMAP, height: int = 320,
               max_lines: int = MAX_DRAWN) -> Image.Image:
    """Render an ``Explanation`` (``explain(..., pair=True)``) as one picture with its legend."""
    f = font(max(12, height // 22))
    pad, gap, title_h = max(8, height // 32), max(24, height // 8), max(20, height // 14)
    panels = []
    if ex.query is not None and ex.query_image is not None:
        panels.append(("query", *_panel(ex.query_image, ex.query, ex.query_box, height, alpha, colormap)))
    panels.append(("result", *_panel(ex.result_image, ex.result, ex.result_box, height, alpha, colormap)))
    width = pad * 2 + sum(p[1].size[0] for p in panels) + gap * (len(panels) - 1)
    lines = list(ex.extra.get("lines") or []) if len(panels) == 2 else []
    extra = []
    if len(panels) == 2:
        if lines:
            shown = min(len(lines), max_lines)
            extra.append(f"lines: {shown} strongest locally matched regions "
                         f"({ex.extra.get('inliers', 0)} kept by RANSAC of {ex.extra.get('matches', 0)})")
        elif "lines" in ex.extra:
            extra.append("lines: no local regions matched")
        else:
            extra.append("lines: this encoder has no local features to match")
    unseen = any(_unseen(img, box) for img, box in ((ex.query_image, ex.query_box), (ex.result_image, ex.result_box))
                 if img is not None)
    band = legend_band(max(width, 360), colormap=colormap, label=ex.label, note=ex.note, unseen=unseen,
                       contours=True, extra=extra)
    width = max(width, band.size[0])
    canvas = Image.new("RGB", (width, title_h + height + pad + band.size[1]), BAND_BG)
    d = ImageDraw.Draw(canvas)
    x = (width - (sum(p[1].size[0] for p in panels) + gap * (len(panels) - 1))) // 2
    origins = []
    for name, img, scale in panels:
        canvas.paste(img, (x, title_h))
        d.text((x, title_h // 2), name, fill=TEXT, font=f, anchor="lm")
        origins.append((x, title_h, scale))
        x += img.size[0] + gap
    if len(panels) == 2:
        (qx, qy, qs), (rx, ry, rs) = origins
        lw = max(2, height // 140)
        for k, ln in enumerate(lines[:max_lines]):
            p = (qx + ln["query"][0] * qs, qy + ln["query"][1] * qs)
            r = (rx + ln["result"][0] * rs, ry + ln["result"][1] * rs)
            colour = LINE_COLOURS[k % len(LINE_COLOURS)]
            d.line((p, r), fill=(0, 0, 0), width=lw + 2)
            d.line((p, r), fill=colour, width=lw)
            for cx, cy in (p, r):
                rad = lw + 2
                d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=colour, outline=(0, 0, 0))
    canvas.paste(band, (0, title_h + height + pad))
    return canvas


def _unseen(image, box) -> bool:
    if box is None:
        return False
    w, h = image.size
    left, top, right, bottom = box
    return left > 0.5 or top > 0.5 or right < w - 0.5 or bottom < h - 0.5


def pair_png(ex, **kwargs) -> bytes:
    return png_bytes(pair_image(ex, **kwargs))
