"""The region tests' pictures: skimage photos + a "poster" (the coffee photo with a crop of the cat photo
pasted on it; the cat photo itself is not indexed)."""

from __future__ import annotations

import io

from PIL import Image

INDEXED = ("astronaut", "coffee", "rocket", "camera", "horse", "moon")
PLANTED = (330, 120, 480, 240)            # where the cat's face sits on the poster (x0, y0, x1, y1)
CAT_FACE = (110, 20, 300, 172)            # the face in the chelsea photo (x0, y0, x1, y1)


def cat_face(photos) -> Image.Image:
    return photos["chelsea"].crop(CAT_FACE)


def poster(photos) -> Image.Image:
    """coffee (600x400) with the cat's face resized into PLANTED (7.5 % of its area)."""
    out = photos["coffee"].copy()
    x0, y0, x1, y1 = PLANTED
    out.paste(cat_face(photos).resize((x1 - x0, y1 - y0), Image.BICUBIC), (x0, y0))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


