"""Loading images of every common mode into RGB, safely.

``load_image`` accepts a path, raw bytes, a binary file object or a PIL image and returns an RGB
``PIL.Image``:

* RGBA / LA / P-with-transparency are composited on white (stamps and logos stay visible);
* L, 1, I;16 / I / F (16-bit and float greyscale) are rescaled to 8-bit and expanded to RGB;
* CMYK and YCbCr JPEGs are converted to RGB;
* EXIF orientation is applied (phone photos come out upright);
* animated GIF / WebP / APNG: the first frame;
* images over ``max_pixels`` (default :func:`retrieval.settings.max_pixels`: ``LOUPE_MAX_PIXELS``, read
  at each call, else 100 megapixels) raise ``ImageTooLargeError`` *before* the pixels are decoded
  (decompression-bomb guard), and so do images whose decode would take more than ``max_bytes``
  (:func:`retrieval.settings.max_decode_bytes`: ``LOUPE_MAX_DECODE_MB``, else 256 MiB): width × height ×
  the bytes per pixel of the decoded mode (:func:`decoded_bytes`: 1 for L/P, 2 for 16-bit, 4 for RGB,
  RGBA, CMYK, I and F, as Pillow stores them);
* ``min_side``: the shorter side the caller needs (an encoder's input, e.g. 256). An image at least twice
  ``max(REDUCING_GAP × min_side, MIN_REDUCED_SIDE)`` (4 × 256 = 1024 px) on its shorter side is decoded
  reduced — a JPEG through ``Image.draft`` (the decoder scales by 1/2, 1/4 or 1/8), then any format by an
  integer factor (``Image.reduce``, alpha premultiplied) — to no less than that: a big upload costs memory
  in proportion to what is used, and the encoder's own resize still does the final, anti-aliased step.
  Smaller images are untouched (their vectors do not change).

Pillow's process-wide settings (``Image.MAX_IMAGE_PIXELS``, ``ImageFile.LOAD_TRUNCATED_IMAGES``) are left
as the host application set them: Loupe checks its own limits per call, and Pillow's decompression-bomb
warning is silenced only inside these calls (its error, above twice its limit, becomes an
``ImageTooLargeError`` that names Loupe's limit).

Anything that is not a decodable image raises ``InvalidImageError`` with the reason.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval import settings
from retrieval.errors import ImageTooLargeError, InvalidImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

#: how much larger than the caller's ``min_side`` a reduced decode stays (Pillow's ``reducing_gap``: at 3
#: and above, reduce-then-resize is indistinguishable from resizing the full image by the same filter)
REDUCING_GAP = 4.0
#: a reduced decode never goes below this shorter side, whatever ``min_side`` (images under twice this are
#: never reduced: ordinary photos embed exactly as from a full decode, even for small-input encoders)
MIN_REDUCED_SIDE = 1024
_SLAB_PIXELS = 1 << 22      # 16-bit / float greyscale is rescaled to 8-bit in row slabs of this many pixels
_WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}   # others: 4
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image


def _open(source: ImageSource, limit: int | None = None) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise InvalidImageError("empty file (0 bytes)")
        fp: BinaryIO | str = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise InvalidImageError("empty file (0 bytes)")
        except FileNotFoundError as exc:
            raise InvalidImageError(f"file not found (or broken symlink): {path}") from exc
        except PermissionError as exc:
            raise InvalidImageError(f"permission denied: {path}") from exc
        fp = str(path)
    else:
        fp = source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, settings.max_pixels() if limit is None else limit) from None
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not a recognised image format") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"permission denied: {source}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"cannot open image: {exc}") from exc


def _too_large(width: int, height: int, limit: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
        "(set LOUPE_MAX_PIXELS to raise it)")


def _bomb_error(exc: Exception, limit: int) -> ImageTooLargeError:
    """Pillow's ``DecompressionBombError`` (over twice ``Image.MAX_IMAGE_PIXELS``) as Loupe's own error."""
    found = _BOMB_PIXELS.search(str(exc))
    pixels = int(found.group(1)) if found else None
    if pixels is not None and limit and pixels > limit:
        return ImageTooLargeError(f"image is {pixels:,} pixels, over the limit of {limit:,} "
                                  "(set LOUPE_MAX_PIXELS to raise it)")
    return ImageTooLargeError(
        f"image is {f'{pixels:,} pixels' if pixels else 'too large'}: Pillow's decompression-bomb guard in this "
        f"process refuses it ({exc}); raise PIL.Image.MAX_IMAGE_PIXELS in the application to decode it")


def decoded_bytes(size: tuple[int, int], mode: str) -> int:
    """The memory Pillow takes to hold pixels of ``size`` in ``mode`` (1 byte for 1/L/P, 2 for I;16, else 4)."""
    return int(size[0]) * int(size[1]) * _BYTES_PER_PIXEL.get(mode, 4)


def _bytes_error(size: tuple[int, int], mode: str, limit: int) -> ImageTooLargeError:
    need = decoded_bytes(size, mode)
    return ImageTooLargeError(
        f"image is {size[0]}x{size[1]} {mode}: decoding it takes {need / (1 << 20):,.0f} MiB, over the limit of "
        f"{limit / (1 << 20):,.0f} MiB (send a smaller image — {_fit_hint(size, mode, limit)} — or set "
        "LOUPE_MAX_DECODE_MB to raise the limit)")


def _fit_hint(size: tuple[int, int], mode: str, limit: int) -> str:
    scale = math.sqrt(limit / max(1, decoded_bytes(size, mode)))
    return f"at most {max(1, int(size[0] * scale))}x{max(1, int(size[1] * scale))}" + (
        ", or 8-bit instead of 16-bit" if mode in _WIDE_MODES[:4] else "")


def _keep_side(min_side: int) -> float:
    """The shorter side a reduced decode keeps at least: ``REDUCING_GAP × min_side``, ``MIN_REDUCED_SIDE`` or more."""
    return max(REDUCING_GAP * min_side, MIN_REDUCED_SIDE)


def _reduce_factor(size: tuple[int, int], min_side: int | None) -> int:
    """The integer factor that keeps the shorter side at least ``_keep_side(min_side)`` (1: no reduction)."""
    if not min_side or min_side <= 0:
        return 1
    return max(1, int(min(size) // _keep_side(min_side)))


def _draft(img: Image.Image, min_side: int | None) -> None:
    """Ask a JPEG decoder for a DCT-scaled decode (1/2, 1/4, 1/8) no smaller than ``_keep_side(min_side)``
    on the shorter side (a no-op for other formats and for images already decoded)."""
    if _reduce_factor(img.size, min_side) < 2 or not getattr(img, "tile", None):
        return
    w, h = img.size
    keep = _keep_side(min_side) / min(w, h)
    img.draft(None, (max(1, math.ceil(w * keep)), max(1, math.ceil(h * keep))))


def _reduce(img: Image.Image, factor: int) -> Image.Image:
    """``img`` shrunk by ``factor`` with a box filter (alpha premultiplied, so edges composite as before)."""
    if img.mode == "1":
        img = img.convert("L")
    elif img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N"):   # Image.reduce has no 16-bit kernel; a box resize does
        w, h = img.size
        return img.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX,
                          box=(0, 0, w // factor * factor, h // factor * factor))
    if img.mode in ("RGBA", "LA"):
        premultiplied = "RGBa" if img.mode == "RGBA" else "La"
        return img.convert(premultiplied).reduce(factor).convert(img.mode)
    return img.reduce(factor)


def _slabs(img: Image.Image):
    """(top row, pixels) of ``img`` in row slabs of about ``_SLAB_PIXELS`` (bounded numpy copies)."""
    w, h = img.size
    rows = max(1, _SLAB_PIXELS // max(1, w))
    for y in range(0, h, rows):
        yield y, np.asarray(img.crop((0, y, w, min(h, y + rows))))


def _extrema(img: Image.Image) -> tuple[float, float]:
    """(min, max) of a greyscale image's values, NaN ignored (``_to_8bit``'s range)."""
    lo, hi = math.inf, -math.inf
    for _, arr in _slabs(img):
        lo, hi = min(lo, float(np.nanmin(arr))), max(hi, float(np.nanmax(arr)))
    return lo, hi


def _to_8bit(img: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """I;16 / I / F greyscale → L, rescaling by the type's range (16-bit PNGs, TIFFs); ``extrema``: the range
    of the full-size image when ``img`` was reduced from it. Done in row slabs (bounded temporaries)."""
    lo, hi = _extrema(img) if extrema is None else extrema
    top = max(hi, 0.0)                          # arr.max(initial=0)
    out = np.empty((img.size[1], img.size[0]), dtype=np.uint8)
    for y, arr in _slabs(img):
        if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
            scale = 65535.0 if top > 255 else 255.0
            arr = np.clip(arr.astype(np.float64) / scale * 255.0, 0, 255)
        elif img.mode == "F":
            arr = (arr - lo) / (hi - lo or 1.0) * 255.0
        out[y:y + arr.shape[0]] = np.asarray(arr, dtype=np.uint8).reshape(arr.shape[:2])
    return Image.fromarray(out)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _to_8bit(img)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(source: ImageSource, *, max_pixels: int | None = None, max_bytes: int | None = None,
               min_side: int | None = None) -> Image.Image:
    """Open, validate and decode an image into RGB (see module docstring). ``max_pixels`` / ``max_bytes``
    (0: off) default to ``LOUPE_MAX_PIXELS`` / ``LOUPE_MAX_DECODE_MB``; the byte bound applies to images
    still to be decoded (a path, bytes, a file, an unloaded ``Image.open``), after any reduced decode.
    ``min_side``: decode images ``REDUCING_GAP`` times larger reduced (module docstring). A PIL image
    that needs no change (RGB, upright, not reduced) is returned as it is, not copied."""
    limit = settings.max_pixels() if max_pixels is None else max_pixels
    byte_limit = settings.max_decode_bytes() if max_bytes is None else max_bytes
    img = _open(source, limit)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"invalid image size {width}x{height}")
    if limit and width * height > limit:
        raise _too_large(width, height, limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # Pillow's bomb warning (Loupe checked above), odd metadata
            if getattr(img, "is_animated", False):
                img.seek(0)
            pending = bool(getattr(img, "tile", None))      # not decoded yet
            if not isinstance(source, Image.Image):     # draft() resizes in place: never a caller's image
                _draft(img, min_side)
            if pending and byte_limit and decoded_bytes(img.size, img.mode) > byte_limit:
                raise _bytes_error(img.size, img.mode, byte_limit)
            img.load()
            factor = _reduce_factor(img.size, min_side)
            extrema = _extrema(img) if factor > 1 and img.mode in _WIDE_MODES else None
            if factor > 1:
                img = _reduced(img, factor)
            if _orientation(img) != 1:                  # (exif_transpose would copy an upright image)
                img = ImageOps.exif_transpose(img) or img  # upright, and the orientation tag dropped
            if extrema is not None:
                img = _to_8bit(img, extrema)
            return to_rgb(img)
    except InvalidImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, limit) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc


def _reduced(img: Image.Image, factor: int) -> Image.Image:
    """``_reduce`` that keeps the EXIF orientation with the pixels (a TIFF keeps it outside ``info``)."""
    orientation = _orientation(img)     # after load: a PNG may keep its EXIF after the pixels
    exif = img.getexif() if orientation != 1 else None
    small = _reduce(img, factor)
    if exif is not None and _orientation(small) != orientation:
        small.info["exif"] = exif.tobytes()
    return small


def _orientation(img: Image.Image, *, header_only: bool = False) -> int:
    """The EXIF orientation tag (1: upright; broken EXIF counts as upright). ``header_only``: never decode
    pixels to find it (Pillow loads a whole PNG to look for EXIF after the image data; such a PNG counts
    as upright)."""
    if header_only and img.format == "PNG" and "exif" not in img.info and getattr(img, "tile", None):
        return 1
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - broken EXIF is not fatal
        return 1


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    img = _open(source)
    w, h = img.size
    return (h, w) if _orientation(img, header_only=True) in (5, 6, 7, 8) else (w, h)
