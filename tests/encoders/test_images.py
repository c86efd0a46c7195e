"""Images of every common mode load into correct RGB; bad files raise clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from retrieval.errors import ImageTooLargeError, InvalidImageError
from retrieval.images import image_size, load_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))       # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))                # one opaque blue pixel
    out = load_image(_bytes(img, "PNG"))
    assert out.mode == "RGB" and out.size == (8, 8)
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_la_and_half_transparent():
    img = Image.new("LA", (4, 4), (0, 128))               # black at 50% alpha → mid grey
    r, g, b = load_image(_bytes(img, "PNG")).getpixel((1, 1))
    assert r == g == b and 120 <= r <= 135


def test_palette_with_transparency():
    img = Image.new("P", (6, 6), 0)
    img.putpalette([0, 255, 0] + [255, 0, 0] * 255)
    img.putpixel((2, 2), 1)
    data = _bytes(img, "PNG", transparency=0)             # index 0 (green) is transparent
    out = load_image(data)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((2, 2)) == (255, 0, 0)


def test_palette_without_transparency_keeps_colours():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    assert load_image(_bytes(img, "GIF")).getpixel((1, 1)) == (10, 20, 30)


def test_greyscale_l():
    img = Image.new("L", (5, 5), 77)
    assert load_image(_bytes(img, "PNG")).getpixel((2, 2)) == (77, 77, 77)


def test_16bit_png_rescaled():
    arr = np.full((4, 4), 65535, dtype=np.uint16)
    arr[0, 0] = 0
    arr[1, 1] = 32768
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    out = load_image(_bytes(img, "PNG"))
    assert out.getpixel((3, 3)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert 126 <= out.getpixel((1, 1))[0] <= 129


def test_cmyk_jpeg():
    img = Image.new("CMYK", (8, 8), (0, 255, 255, 0))     # pure red in CMYK
    out = load_image(_bytes(img, "JPEG", quality=95))
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))           # white left half
    exif = Image.Exif()
    exif[0x0112] = 6                                      # rotate 90° clockwise to display
    data = _bytes(img, "JPEG", exif=exif.tobytes(), quality=95)
    out = load_image(data)
    assert out.size == (20, 40)                          # upright: portrait
    assert image_size(data) == (20, 40)
    assert np.asarray(out)[:15].mean() > 200 and np.asarray(out)[25:].mean() < 50  # white on top


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    r, g, b = load_image(buf.getvalue()).getpixel((3, 3))
    assert r > 200 and b < 60


def test_one_pixel_and_path(tmp_path):
    path = tmp_path / "ünïcode name.png"
    Image.new("RGB", (1, 1), (1, 2, 3)).save(path)
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)
    assert load_image(str(path)).size == (1, 1)


def test_pixel_limit_is_enforced_before_decoding():
    data = _bytes(Image.new("L", (3000, 3000), 0), "PNG")  # small file, 9 Mpx
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(data, max_pixels=5_000_000)
    assert load_image(data, max_pixels=10_000_000).size == (3000, 3000)


def test_pixel_limit_env_is_read_at_each_call(monkeypatch):
    """LOUPE_MAX_PIXELS set after import still applies (retrieval.settings reads it at call time)."""
    data = _bytes(Image.new("L", (300, 300), 0), "PNG")
    monkeypatch.setenv("LOUPE_MAX_PIXELS", "50000")
    with pytest.raises(ImageTooLargeError, match="LOUPE_MAX_PIXELS"):
        load_image(data)
    monkeypatch.setenv("LOUPE_MAX_PIXELS", "90000")
    assert load_image(data).size == (300, 300)


@pytest.mark.parametrize("payload,reason", [
    (b"", "empty"),
    (b"this is not an image at all", "not a recognised image"),
])
def test_bad_bytes(payload, reason):
    with pytest.raises(InvalidImageError, match=reason):
        load_image(payload)


def test_truncated_jpeg(photos):
    data = _bytes(photos["astronaut"], "JPEG", quality=90)
    with pytest.raises(InvalidImageError):
        load_image(data[: len(data) // 3])


def test_missing_and_broken_symlink(tmp_path):
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    link = tmp_path / "broken.jpg"
    link.symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(InvalidImageError, match="not found"):
        load_image(link)


def test_atomic_writes_get_normal_file_permissions(tmp_path):
    """Index files and overlays must be readable by other users (a server account), not 0600."""
    import os
    import stat

    from retrieval.index import store

    old = os.umask(0o022)
    try:
        store.atomic_write_bytes(tmp_path / "a.bin", b"x")
        store.atomic_write_with(tmp_path / "b.bin", lambda tmp: open(tmp, "wb").write(b"y"))
    finally:
        os.umask(old)
    for name in ("a.bin", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
