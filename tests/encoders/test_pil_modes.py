"""The Python API takes PIL images of every mode, normalised exactly as ``load_image`` normalises a path
(RGB, transparency on white, 16-bit rescaled, palette transparency, CMYK, EXIF orientation), for every
encoder family; and big images are decoded reduced without moving the vectors of ordinary ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _engine_helpers import png_bytes
from PIL import Image

from retrieval.encoders import create_encoder
from retrieval.images import load_image


def _mode_files(photos, tmp_path) -> dict[str, object]:
    """One file per awkward mode, from a real photo: {file name: path}."""
    base = photos["coffee"].resize((120, 90))
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    exif = Image.Exif()
    exif[0x0112] = 6                                    # shown rotated 90° clockwise
    files = {"RGBA.png": (rgba, {}), "LA.png": (base.convert("LA"), {}), "P.png": (palette, {"transparency": 0}),
             "I16.png": (grey16, {}), "CMYK.jpg": (base.convert("CMYK"), {"quality": 95}),
             "rotated.jpg": (base, {"exif": exif.tobytes(), "quality": 95})}
    out = {}
    for name, (img, kw) in files.items():
        img.save(tmp_path / name, **kw)
        out[name] = tmp_path / name
    return out


@pytest.fixture(scope="module")
def encoders(effnet, tiny_clip, tiny_dino):
    found = {"effnet-lite0": effnet, "clip": create_encoder(tiny_clip, device="cpu"),
             "dinov2": create_encoder(tiny_dino, device="cpu"),
             "colour-names": create_encoder("colour-names", device="cpu")}
    try:
        found["pdq"] = create_encoder("pdq", device="cpu")
    except Exception:  # noqa: BLE001 - the optional extra is not installed
        pass
    return found


def test_pil_images_of_every_mode_encode_like_their_paths(encoders, photos, tmp_path):
    files = _mode_files(photos, tmp_path)
    for enc_name, enc in encoders.items():
        for name, path in files.items():
            with Image.open(path) as opened:
                from_pil = enc.encode_images([opened])
            np.testing.assert_array_equal(from_pil, enc.encode_images([path]), err_msg=f"{enc_name} {name}")
            np.testing.assert_array_equal(from_pil, enc.encode_images([load_image(path)]), err_msg=f"{enc_name} {name}")
    upright = load_image(files["rotated.jpg"])
    assert upright.size == (90, 120)                    # the EXIF orientation is applied to PIL input too
    effnet = encoders["effnet-lite0"]
    with Image.open(files["rotated.jpg"]) as opened:
        np.testing.assert_array_equal(effnet.encode_images([opened]), effnet.encode_images([upright]))


def test_ordinary_images_embed_exactly_as_before(effnet, photos, tmp_path):
    """Below REDUCING_GAP × the encoder's input side nothing is reduced: the vectors are the old ones
    (preprocess of the full decode), bit for bit."""
    path = tmp_path / "coffee.jpg"
    photos["coffee"].resize((1000, 700)).save(path, quality=92)
    old = effnet.encode_images(torch.stack([effnet.preprocess(load_image(path))]))
    np.testing.assert_array_equal(effnet.encode_images([path]), old)
    np.testing.assert_array_equal(effnet.encode_images([path.read_bytes()]), old)
    np.testing.assert_array_equal(effnet.encode_images([load_image(path)]), old)


def test_draft_decoded_embedding_is_close_to_the_full_decode(effnet, photos):
    tiles = [img.resize((256, 256)) for img in photos.values()]
    canvas = Image.new("RGB", (3072, 2560))
    for i, y in enumerate(range(0, 2560, 256)):
        for j, x in enumerate(range(0, 3072, 256)):
            canvas.paste(tiles[(i * 7 + j) % len(tiles)], (x, y))
    data = png_bytes(canvas, "JPEG", quality=90)
    assert effnet.input_side == 256
    assert load_image(data, min_side=effnet.input_side).size == (1536, 1280)      # DCT-scaled by 1/2
    full = effnet.encode_images(torch.stack([effnet.preprocess(load_image(data))]))[0]
    reduced = effnet.encode_images([data])[0]
    assert float(full @ reduced) > 0.99
