"""A query box: ``[x0, y0, x1, y1]`` in pixels of the query image (as shown: EXIF orientation applied).

Two checks, because the request is validated before the image is decoded:

* ``parse_box`` (``SearchRequest``): four finite numbers, ``x0 < x1``, ``y0 < y1``, none negative;
* ``check_box_in_image``: inside the image's width and height (known once the image is opened).

``crop_to_box`` crops a decoded image; an upload decoded reduced (``load_image(min_side=...)``) is cropped at
the box scaled to the decoded size (``full_size`` reads the original size from the file's header).
"""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from PIL import Image

from retrieval.errors import InvalidQueryError

Box = tuple[float, float, float, float]
_ROTATED = (5, 6, 7, 8)       # EXIF orientations that swap width and height


def parse_box(value: Any, name: str = "box") -> Box:
    """``value`` as a box ``(x0, y0, x1, y1)``; raises ``InvalidQueryError`` naming the problem."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.strip().strip("[]()").split(",")]
        try:
            value = [float(p) for p in parts if p != ""] if any(parts) else []
        except ValueError:
            raise InvalidQueryError(f"{name} must be four numbers x0,y0,x1,y1, got {value!r}") from None
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise InvalidQueryError(f"{name} must be four numbers [x0, y0, x1, y1] (pixels of the query image)")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) for v in value):
        raise InvalidQueryError(f"{name} must be four finite numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in value)
    if min(x0, y0, x1, y1) < 0:
        raise InvalidQueryError(f"{name} {list(value)} has a negative coordinate; pixels start at 0")
    if x1 <= x0 or y1 <= y0:
        raise InvalidQueryError(f"{name} {list(value)} has no area: it needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def check_box_in_image(box: Sequence[float], size: Sequence[int], name: str = "box") -> Box:
    """The box, checked to lie inside an image of ``size = (width, height)``."""
    x0, y0, x1, y1 = parse_box(list(box), name)
    w, h = int(size[0]), int(size[1])
    if x1 > w or y1 > h:
        raise InvalidQueryError(f"{name} {[_num(v) for v in (x0, y0, x1, y1)]} is outside the query image "
                                f"({w}x{h} pixels): it needs x1 <= {w} and y1 <= {h}")
    if (x1 - x0) < 1 or (y1 - y0) < 1:
        raise InvalidQueryError(f"{name} {[_num(v) for v in (x0, y0, x1, y1)]} is smaller than one pixel")
    return x0, y0, x1, y1


def full_size(source: Any) -> tuple[int, int] | None:
    """The upright (EXIF-rotated) size of encoded image bytes, from the header; None for a PIL image."""
    if not isinstance(source, (bytes, bytearray)):
        return None
    try:
        with Image.open(io.BytesIO(bytes(source))) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the decoder reports a bad image itself
        return None
    return (h, w) if orientation in _ROTATED else (w, h)


def crop_to_box(image: Image.Image, box: Sequence[float], size: Sequence[int] | None = None) -> Image.Image:
    """Crop ``image`` to ``box`` given in pixels of an image of ``size`` (default: ``image.size``; a reduced
    decode of a larger original is cropped at the scaled box)."""
    w, h = image.size
    sw, sh = (size or image.size)
    fx, fy = w / float(sw), h / float(sh)
    x0, y0, x1, y1 = box
    left, top = int(math.floor(x0 * fx)), int(math.floor(y0 * fy))
    right, bottom = max(left + 1, int(math.ceil(x1 * fx))), max(top + 1, int(math.ceil(y1 * fy)))
    return image.crop((left, top, min(right, w), min(bottom, h)))


def _num(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v
