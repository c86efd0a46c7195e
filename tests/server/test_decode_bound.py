"""Hardening (#18), bounded decoding: a small upload that decodes huge is refused from its header (bytes,
not only pixels), big JPEGs are decoded reduced, and the server decodes a bounded number of uploads at once.

* ``LOUPE_MAX_DECODE_MB``: width × height × bytes per pixel of the decoded mode, checked before decoding;
* ``load_image(min_side=...)``: JPEG ``draft`` + ``Image.reduce`` down to what the encoder needs;
* ``LOUPE_MAX_DECODES`` / ``LOUPE_DECODE_WAIT``: a request that gets no decode slot in time is a 503 ``busy``
  with ``Retry-After``;
* Pillow's process-wide bomb guard is left alone (``Image.MAX_IMAGE_PIXELS``), and its error is Loupe's.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from _engine_helpers import build_photo_index, png_bytes
from PIL import Image

import retrieval.images as images
from retrieval.engine.engine import Engine
from retrieval.errors import ImageTooLargeError
from retrieval.images import load_image
from server.app import create_app


def png16(width: int, height: int, value: int = 0x0303) -> bytes:
    """A valid 16-bit greyscale PNG of one value, written row block by row block (no 200 MB array): the
    10,000 × 10,000 one is ~210 KB on disk and 200 MB decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + struct.pack(">H", value) * width
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    block = 500
    idat = [comp.compress(row * block) for _ in range(height // block)]
    idat += [comp.compress(row * (height % block)), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def big_jpeg(photos, width: int, height: int) -> bytes:
    """A ``width`` × ``height`` JPEG tiled from the sample photos (real detail at every scale)."""
    tiles = [img.resize((256, 256)) for img in photos.values()]
    canvas = Image.new("RGB", (width, height))
    for i, y in enumerate(range(0, height, 256)):
        for j, x in enumerate(range(0, width, 256)):
            canvas.paste(tiles[(i * 7 + j) % len(tiles)], (x, y))
    return png_bytes(canvas, "JPEG", quality=90)


@pytest.fixture(scope="module")
def bomb16(tmp_path_factory) -> bytes:
    data = png16(10_000, 10_000)
    (tmp_path_factory.mktemp("bomb") / "bomb16.png").write_bytes(data)
    return data


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_clip, photos):
    folder = tmp_path_factory.mktemp("decode-photos")
    paths = []
    for name in ("chelsea", "coffee", "rocket"):
        photos[name].save(folder / f"{name}.png")
        paths.append(folder / f"{name}.png")
    return Engine(build_photo_index(tmp_path_factory.mktemp("decode-index"), paths, [tiny_clip]), device="cpu")


def _upload(client, data: bytes, name: str = "q.png"):
    return client.post("/api/search", data={"image": (io.BytesIO(data), name), "k": "2"},
                       content_type="multipart/form-data")


# -- the byte bound --------------------------------------------------------------------------------------
def test_16bit_png_is_refused_by_the_byte_bound(bomb16, monkeypatch):
    """10,000 × 10,000 16-bit: under the 100-megapixel limit, 200 MB decoded from ~210 KB: refused from the
    header (no pixel decoded) when over LOUPE_MAX_DECODE_MB, with what to do."""
    assert len(bomb16) < 300_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)     # Pillow's own, over 89 Mpx
        with Image.open(io.BytesIO(bomb16)) as img:
            assert img.mode == "I;16" and img.size == (10_000, 10_000)
    monkeypatch.setenv("LOUPE_MAX_DECODE_MB", "128")
    with pytest.raises(ImageTooLargeError, match="LOUPE_MAX_DECODE_MB") as err:
        load_image(bomb16)
    assert "191 MiB" in str(err.value) and "8-bit" in str(err.value)
    with pytest.raises(ImageTooLargeError, match="over the limit of 64 MiB"):
        load_image(bomb16, max_bytes=64 << 20)
    monkeypatch.setenv("LOUPE_MAX_DECODE_MB", "300")    # read at each call: now it fits the bound
    with pytest.raises(ImageTooLargeError, match="LOUPE_MAX_PIXELS"):
        load_image(bomb16, max_pixels=50_000_000)       # and the pixel limit still applies first


def test_byte_bound_counts_bytes_per_pixel_of_the_decoded_mode():
    assert images.decoded_bytes((1000, 1000), "I;16") == 2_000_000
    assert images.decoded_bytes((1000, 1000), "RGBA") == images.decoded_bytes((1000, 1000), "F") == 4_000_000
    assert images.decoded_bytes((1000, 1000), "RGB") == 4_000_000        # Pillow keeps RGB at 4 bytes a pixel
    assert images.decoded_bytes((1000, 1000), "L") == images.decoded_bytes((1000, 1000), "P") == 1_000_000
    grey = png_bytes(Image.new("L", (1000, 1000), 9))
    rgba = png_bytes(Image.new("RGBA", (1000, 1000), (9, 9, 9, 9)))
    assert load_image(grey, max_bytes=1_000_000).size == (1000, 1000)
    with pytest.raises(ImageTooLargeError, match="at most 500x500"):
        load_image(rgba, max_bytes=1_000_000)
    already = Image.new("RGBA", (1000, 1000))                 # in memory: nothing left to decode, no bound
    assert load_image(already, max_bytes=1_000_000).size == (1000, 1000)


def test_server_answers_the_16bit_png_with_a_413_json_error(engine, bomb16, monkeypatch):
    monkeypatch.setenv("LOUPE_MAX_DECODE_MB", "128")
    client = create_app(engine=engine).test_client()
    resp = _upload(client, bomb16)
    assert resp.status_code == 413, resp.get_data(as_text=True)[:300]
    err = resp.get_json()["error"]
    assert err["code"] == "image_too_large" and "LOUPE_MAX_DECODE_MB" in err["message"]
    assert _upload(client, png_bytes(Image.new("RGB", (64, 48), "red"))).status_code == 200   # slot released


# -- reduced decoding ---------------------------------------------------------------------------------------
def test_big_jpeg_is_draft_decoded_to_what_the_encoder_needs(photos, monkeypatch):
    data = big_jpeg(photos, 4096, 4096)
    drafts = []
    from PIL import JpegImagePlugin

    real_jpeg_draft = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: (drafts.append(size), real_jpeg_draft(self, mode, size))[1])
    out = load_image(data, min_side=256)
    assert drafts == [(1024, 1024)]
    assert out.size == (1024, 1024) and out.mode == "RGB"       # DCT-scaled by 1/4: 4 MB, not 64 MB
    # the bound applies to what is decoded: the full image (64 MiB) is over 16 MiB, the draft is not
    with pytest.raises(ImageTooLargeError):
        load_image(data, max_bytes=16 << 20)
    assert load_image(data, max_bytes=16 << 20, min_side=256).size == (1024, 1024)
    assert load_image(data).size == (4096, 4096)                # no target: the full image
    # a caller's own PIL image is never drafted in place (draft resizes the object it is called on)
    with Image.open(io.BytesIO(data)) as opened:
        assert load_image(opened, min_side=256).size == (1024, 1024) and opened.size == (4096, 4096)


def test_reduced_images_are_upright_once(photos):
    """EXIF orientation survives the reduced decode, and the result carries no orientation left to apply."""
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = Image.new("RGB", (4096, 2048), "black")
    wide.paste((255, 255, 255), (0, 0, 2048, 2048))               # white left half → white top when upright
    for fmt, kw in (("JPEG", {"quality": 90}), ("PNG", {}), ("TIFF", {})):
        out = load_image(png_bytes(wide, fmt, exif=exif.tobytes(), **kw), min_side=256)
        assert out.size == (1024, 2048), fmt
        assert np.asarray(out)[:900].mean() > 200 and np.asarray(out)[1100:].mean() < 50, fmt
        assert load_image(out, min_side=256).size == (1024, 2048), fmt      # not rotated a second time


def test_png_is_reduced_after_decoding_and_16bit_keeps_its_range():
    arr = np.full((2400, 2048), 20000, dtype=np.uint16)
    arr[:1200] = 60000
    data = png_bytes(Image.fromarray(arr))
    out = load_image(data, min_side=256)
    assert out.size == (1024, 1200)                             # reduced by 2: shorter side ≥ 4 × 256
    full = np.asarray(load_image(data))
    small = np.asarray(out)
    assert abs(int(small[0, 0, 0]) - int(full[0, 0, 0])) <= 1 and abs(int(small[-1, -1, 0]) - int(full[-1, -1, 0])) <= 1
    rgba = Image.new("RGBA", (2048, 2048), (255, 0, 0, 0))      # transparent red → white, even reduced
    rgba.paste((0, 0, 255, 255), (0, 0, 1024, 2048))
    reduced = np.asarray(load_image(png_bytes(rgba), min_side=256))
    assert reduced.shape == (1024, 1024, 3)
    assert (reduced[:, 600:] == 255).all() and (reduced[:, :500] == (0, 0, 255)).all()


# -- the concurrency cap -------------------------------------------------------------------------------------
def test_an_upload_that_gets_no_decode_slot_is_a_503_busy(engine, monkeypatch):
    monkeypatch.setenv("LOUPE_MAX_DECODES", "1")
    monkeypatch.setenv("LOUPE_DECODE_WAIT", "0.2")
    entered, release = threading.Event(), threading.Event()
    real = images.load_image

    def slow_load(source, **kwargs):
        if not entered.is_set():
            entered.set()
            assert release.wait(10)
        return real(source, **kwargs)

    monkeypatch.setattr(images, "load_image", slow_load)
    app = create_app(engine=engine)
    data = png_bytes(Image.new("RGB", (64, 48), "blue"))
    first: dict = {}
    worker = threading.Thread(target=lambda: first.setdefault("resp", _upload(app.test_client(), data)))
    worker.start()
    try:
        assert entered.wait(10)
        busy = _upload(app.test_client(), data)
        assert busy.status_code == 503 and busy.get_json()["error"]["code"] == "busy"
        assert busy.headers["Retry-After"] == "2" and "LOUPE_MAX_DECODES" in busy.get_json()["error"]["message"]
        text = app.test_client().post("/api/search", json={"text": "a cat", "k": 2})
        assert text.status_code == 200                          # text queries take no slot
    finally:
        release.set()
        worker.join(10)
    assert first["resp"].status_code == 200
    assert _upload(app.test_client(), data).status_code == 200      # the slot came back


# -- Pillow's process-wide settings -------------------------------------------------------------------------
def test_importing_loupe_leaves_pillows_bomb_guard_alone():
    code = ("from PIL import Image, ImageFile; before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES); "
            "import retrieval.images; "
            "assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before, "
            "(Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES); print(Image.MAX_IMAGE_PIXELS)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(int(1024 * 1024 * 1024 // 4 // 3))


def test_pillows_bomb_error_and_warning_become_loupes_limit(monkeypatch):
    data = png_bytes(Image.new("L", (100, 100), 7))         # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)   # Pillow refuses over 8,000
    with pytest.raises(ImageTooLargeError, match=r"10,000 pixels, over the limit of 5,000 .*LOUPE_MAX_PIXELS"):
        load_image(data, max_pixels=5_000)
    with pytest.raises(ImageTooLargeError, match="MAX_IMAGE_PIXELS"):     # Loupe allows it, the host does not
        load_image(data, max_pixels=50_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)   # Pillow only warns (6,000 < 10,000 < 12,000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        assert load_image(data).size == (100, 100)
