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
  (decompression-bomb guard), instead of PIL's warning.

Anything that is not a decodable image raises ``InvalidImageError`` with the reason.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from retrieval import settings
from retrieval.errors import ImageTooLargeError, InvalidImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")

# Loupe enforces its own limit (above); PIL's own bomb check would only warn below 2x its limit.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

ImageSource = str | os.PathLike | bytes | bytearray | BinaryIO | Image.Image


def _open(source: ImageSource) -> Image.Image:
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
    except UnidentifiedImageError as exc:
        raise InvalidImageError("not a recognised image format") from exc
    except PermissionError as exc:
        raise InvalidImageError(f"permission denied: {source}") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidImageError(f"cannot open image: {exc}") from exc


def _to_8bit(img: Image.Image) -> Image.Image:
    """I;16 / I / F greyscale → L, rescaling by the type's range (16-bit PNGs, TIFFs)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16") or (img.mode == "I" and arr.max(initial=0) > 255):
        scale = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr.astype(np.float64) / scale * 255.0, 0, 255)
    elif img.mode == "F":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        arr = (arr - lo) / (hi - lo or 1.0) * 255.0
    return Image.fromarray(np.asarray(arr, dtype=np.uint8).reshape(arr.shape[:2]), mode="L")


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


def load_image(source: ImageSource, *, max_pixels: int | None = None) -> Image.Image:
    """Open, validate and decode an image into RGB (see module docstring)."""
    limit = settings.max_pixels() if max_pixels is None else max_pixels
    img = _open(source)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"invalid image size {width}x{height}")
    if limit and width * height > limit:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} "
            "(set LOUPE_MAX_PIXELS to raise it)"
        )
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return to_rgb(img)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InvalidImageError(f"cannot decode image: {exc}") from exc


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only."""
    img = _open(source)
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - broken EXIF is not fatal
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
