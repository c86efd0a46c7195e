"""The legend drawn under an overlay: what the colours mean, the outline, the hatching, the method, and any
caveat (``Explanation.note``). A band of wrapped items, drawn with Pillow's built-in font."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .overlay import DEFAULT_COLORMAP, HATCH_GREY, TOP_FRACTION, colormap_lut, hatch

__all__ = ["with_legend", "legend_band", "font", "MIN_WIDTH", "BAND_BG", "NOTE_BG"]

MIN_WIDTH = 360             # a legend needs this much width; narrower images are centred on a wider canvas
BAND_BG = (246, 245, 242)
TEXT = (29, 29, 31)
NOTE_BG = (255, 236, 179)   # caveats: amber
NOTE_FG = (102, 60, 0)
BAR = (96, 10)              # colour bar size (px) at scale 1


@lru_cache(maxsize=8)
def font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:       # Pillow < 10.1 / no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_w(f, text: str) -> int:
    left, _, right, _ = f.getbbox(text)
    return int(right - left)


def _wrap(f, text: str, width: int) -> list[str]:
    lines, cur = [], ""
    for word in text.split():
        trial = f"{cur} {word}".strip()
        if cur and _text_w(f, trial) > width:
            lines.append(cur)
            cur = word
        else:
            cur = trial
    return lines + ([cur] if cur else [])


def _items(colormap: str, label: str | None, unseen: bool, contours: bool, extra: list[str]) -> list[tuple]:
    items: list[tuple] = [("bar", colormap)]
    if contours:
        items.append(("contour", f"top {int(TOP_FRACTION * 100)} %"))
    if unseen:
        items.append(("hatch", "not seen by the encoder (outside its centre crop)"))
    items += [("lines", t) for t in extra]
    if label:
        items.append(("text", f"method: {label}"))
    return items


def legend_band(width: int, *, colormap: str = DEFAULT_COLORMAP, label: str | None = None,
                note: str | None = None, unseen: bool = False, contours: bool = True,
                extra: list[str] | None = None) -> Image.Image:
    """An RGB band ``width`` px wide: the items flowed left to right and wrapped; the note on its own rows."""
    s = max(1.0, width / 640.0)
    fs = int(round(13 * s))
    f = font(fs)
    pad, gap, row_h = int(8 * s), int(14 * s), int(fs * 1.5)
    bar_w, bar_h = int(BAR[0] * s), int(BAR[1] * s)
    sw = int(18 * s)                                   # swatch side
    rows: list[list[tuple]] = [[]]
    x = pad
    for kind, text in _items(colormap, label, unseen, contours, extra or []):
        if kind == "bar":
            w = _text_w(f, "less ") + bar_w + _text_w(f, " more: share of the match")
        elif kind in ("contour", "hatch", "lines"):
            w = sw + int(5 * s) + _text_w(f, text)
        else:
            w = _text_w(f, text)
        if rows[-1] and x + w > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((kind, text, x))
        x += w + gap
    note_lines = _wrap(f, note, width - 2 * pad - int(8 * s)) if note else []
    height = pad * 2 + row_h * len(rows) + (row_h * len(note_lines) + int(6 * s) if note_lines else 0)
    band = Image.new("RGB", (width, height), BAND_BG)
    d = ImageDraw.Draw(band)
    for r, row in enumerate(rows):
        cy = pad + r * row_h + row_h // 2
        for kind, text, x0 in row:
            if kind == "bar":
                d.text((x0, cy), "less", fill=TEXT, font=f, anchor="lm")
                bx = x0 + _text_w(f, "less ")
                lut = colormap_lut(text)
                strip = lut[np.linspace(0, 255, bar_w).astype(int)][None].repeat(bar_h, axis=0)
                band.paste(Image.fromarray(strip), (bx, cy - bar_h // 2))
                d.rectangle((bx - 1, cy - bar_h // 2 - 1, bx + bar_w, cy + bar_h - bar_h // 2), outline=TEXT)
                d.text((bx + bar_w, cy), " more: share of the match", fill=TEXT, font=f, anchor="lm")
                continue
            if kind == "text":
                d.text((x0, cy), text, fill=TEXT, font=f, anchor="lm")
                continue
            box = (x0, cy - sw // 2, x0 + sw, cy + sw // 2)
            if kind == "contour":
                d.rectangle(box, fill=(60, 60, 60))
                d.rectangle((box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3), outline=(255, 255, 255),
                            width=max(1, int(s)))
            elif kind == "hatch":
                tile = np.full((sw, sw, 3), 235, np.uint8)
                tile[hatch((sw, sw), spacing=int(6 * s) + 4, width=max(1, int(s)))] = HATCH_GREY
                band.paste(Image.fromarray(tile), box[:2])
                d.rectangle(box, outline=(150, 150, 150))
            else:                                        # match lines
                d.line((box[0], box[3], box[2], box[1]), fill=(0, 0, 0), width=max(3, int(4 * s)))
                d.line((box[0], box[3], box[2], box[1]), fill=(230, 159, 0), width=max(1, int(2 * s)))
            d.text((x0 + sw + int(5 * s), cy), text, fill=TEXT, font=f, anchor="lm")
    if note_lines:
        top = pad + row_h * len(rows)
        d.rectangle((pad, top, width - pad, top + row_h * len(note_lines) + int(4 * s)), fill=NOTE_BG)
        for i, line in enumerate(note_lines):
            d.text((pad + int(4 * s), top + int(2 * s) + i * row_h + row_h // 2), line, fill=NOTE_FG, font=f,
                   anchor="lm")
    return band


def with_legend(img: Image.Image, **kwargs) -> Image.Image:
    """``img`` with ``legend_band`` below it (centred on a canvas at least ``MIN_WIDTH`` wide)."""
    width = max(img.size[0], MIN_WIDTH)
    band = legend_band(width, **kwargs)
    out = Image.new("RGB", (width, img.size[1] + band.size[1]), BAND_BG)
    out.paste(img, ((width - img.size[0]) // 2, 0))
    out.paste(band, (0, img.size[1]))
    return out
