"""The indexer's inputs, in-process: bad inputs skipped with reasons, tricky but valid images decoded
correctly, and the kinds of source (manifests, directories with captions, webdataset tar, URLs)."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from _indexer_helpers import all_rows, cos, index  # tests/ is on sys.path
from PIL import Image

from indexer.pipeline import stored_vectors
from retrieval.index import store

_index, _all_rows, _cos = index, all_rows, cos


# -- bad inputs ----------------------------------------------------------------------------------
def _bomb_png(path: Path) -> None:
    Image.new("1", (10_001, 10_001)).save(path, optimize=False)  # 100,020,001 px, a few KB on disk


def test_bad_inputs_are_skipped_with_reasons(tmp_path, photos, tiny_clip, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    photos["astronaut"].save(src / "good.jpg")
    (src / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    photos["coffee"].save(buf, format="JPEG")
    (src / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (src / "text.jpg").write_text("hello, I am not a JPEG\n")
    _bomb_png(src / "bomb.png")
    os.symlink(tmp_path / "nowhere.jpg", src / "broken-link.jpg")
    photos["rocket"].save(src / "locked.png")
    # tests run as root, where chmod 000 does not stop a read: simulate the refusal at open()
    import indexer.sources as sources

    real_open = open

    def fake_open(path, *a, **kw):
        if str(path).endswith("locked.png"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(sources, "open", fake_open, raising=False)
    out = tmp_path / "idx"
    s = _index([src], out, [tiny_clip])
    reasons = {Path(f.source).name: f.reason for f in s.failed}
    assert s.indexed == 1 and [r["source"] for r in _all_rows(out)] == [str(src / "good.jpg")]
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert "truncated" in reasons["truncated.jpg"]
    assert reasons["text.jpg"] == "not a recognised image format"
    assert "over the limit" in reasons["bomb.png"] and "100,020,001" in reasons["bomb.png"]
    assert reasons["broken-link.jpg"].startswith("broken symlink")
    assert reasons["locked.png"].startswith("permission denied")
    assert len(s.failed) == 6
    # failures are retried (not remembered): the next run reports them again and indexes nothing new
    monkeypatch.undo()
    s2 = _index([src], out, [tiny_clip])
    assert s2.indexed == 1 and s2.skipped == 1 and len(s2.failed) == 5  # locked.png is readable now


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from reading "
                    "(the simulated PermissionError case in test_bad_inputs_are_skipped_with_reasons covers it)")
def test_unreadable_file_real_permissions(tmp_path, photos, tiny_clip):  # pragma: no cover - non-root only
    src = tmp_path / "src"
    src.mkdir()
    photos["astronaut"].save(src / "locked.png")
    os.chmod(src / "locked.png", 0)
    s = _index([src], tmp_path / "idx", [tiny_clip])
    assert s.indexed == 0 and s.failed[0].reason.startswith("permission denied")


def test_bomb_limit_is_configurable(tmp_path, photos, tiny_clip):
    src = tmp_path / "src"
    src.mkdir()
    photos["astronaut"].save(src / "big.png")  # 512x512
    s = _index([src], tmp_path / "idx", [tiny_clip], max_pixels=100_000)
    assert s.indexed == 0 and "over the limit of 100,000" in s.failed[0].reason


# -- tricky but valid images -----------------------------------------------------------------------
def test_tricky_images_are_decoded_correctly(tmp_path, photos, tiny_clip):
    from retrieval.encoders import create_encoder

    enc = create_encoder(tiny_clip, device="cpu")
    src = tmp_path / "src"
    src.mkdir()
    base = photos["chelsea"].resize((96, 64))
    # animated GIF: the first frame is what gets embedded
    first, second = photos["coffee"].resize((64, 64)), photos["rocket"].resize((64, 64))
    first.save(src / "anim.gif", save_all=True, append_images=[second], duration=100, loop=0)
    gif_first = Image.open(src / "anim.gif").convert("RGB")
    # 16-bit greyscale PNG
    grey = np.asarray(photos["camera"].convert("L"), dtype=np.uint16) * 257
    Image.fromarray(grey.astype(np.uint16)).save(src / "grey16.png")
    # CMYK JPEG
    photos["astronaut"].convert("CMYK").save(src / "cmyk.jpg", quality=95)
    # RGBA with a transparent half: composited on white
    rgba = photos["rocket"].convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, : rgba.size[0] // 2] = 0
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(src / "alpha.png")
    on_white = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    photos["coffee"].convert("P", palette=Image.Palette.ADAPTIVE).save(src / "palette.png")
    # EXIF orientation 6 (rotate 90° clockwise to display)
    exif = Image.Exif()
    exif[0x0112] = 6
    base.save(src / "rotated.jpg", exif=exif, quality=95)
    # spaces and non-ASCII characters in the name
    photos["horse"].save(src / "café au lait ☕ 写真.png") if "horse" in photos else photos["moon"].save(
        src / "café au lait ☕ 写真.png")

    out = tmp_path / "idx"
    s = _index([src], out, [tiny_clip])
    assert s.failed == [] and s.indexed == 7
    rows = {Path(r["source"]).name: r for r in _all_rows(out)}
    odd = "café au lait ☕ 写真.png"
    assert odd in rows and rows[odd]["path"] == str(src / odd)
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (64, 96)  # upright
    assert (rows["grey16.png"]["width"], rows["grey16.png"]["height"]) == photos["camera"].size
    vecs, ids = stored_vectors(out, tiny_clip)

    def stored(name):
        return vecs[ids.index(rows[name]["id"])]

    expect = {
        "anim.gif": gif_first,
        "grey16.png": photos["camera"].convert("L").convert("RGB"),
        "alpha.png": on_white,
        # pixels only (no EXIF left to apply: the encoders orient PIL images as load_image does)
        "rotated.jpg": Image.fromarray(np.asarray(Image.open(src / "rotated.jpg").convert("RGB").transpose(
            Image.Transpose.ROTATE_270))),
        "cmyk.jpg": photos["astronaut"],
    }
    wrong = {"anim.gif": second, "alpha.png": photos["rocket"],
             "rotated.jpg": Image.fromarray(np.asarray(Image.open(src / "rotated.jpg").convert("RGB"))),
             "grey16.png": Image.fromarray((grey >> 8).astype(np.uint8) * 0 + 255).convert("RGB"),
             "cmyk.jpg": Image.eval(photos["astronaut"], lambda v: 255 - v)}
    for name, img in expect.items():
        good = _cos(stored(name), enc.encode_images([img])[0])
        bad = _cos(stored(name), enc.encode_images([wrong[name]])[0])
        assert good > 0.98 and good > bad, (name, good, bad)


# -- sources -------------------------------------------------------------------------------------
def test_manifest_sources(tmp_path, photos, tiny_clip):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    names = ["astronaut", "coffee", "rocket"]
    for n in names:
        photos[n].save(imgs / f"{n}.jpg")
    with open(tmp_path / "list.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "caption", "label"])
        w.writerow(["imgs/astronaut.jpg", "a woman in a space suit", "person"])
        w.writerow([str(imgs / "coffee.jpg"), "", "drink"])
    with open(tmp_path / "list.jsonl", "w") as fh:
        fh.write(json.dumps({"path": "imgs/rocket.jpg", "caption": "a rocket", "year": 2020}) + "\n")
        fh.write("{not json\n")
        fh.write(json.dumps({"caption": "no path"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(imgs / "astronaut.jpg")], "caption": ["dup"], "k": [1]}),
                   tmp_path / "list.parquet")
    out = tmp_path / "idx"
    s = _index([tmp_path / "list.csv", tmp_path / "list.jsonl", tmp_path / "list.parquet"], out, [tiny_clip])
    rows = {Path(r["source"]).name: r for r in _all_rows(out)}
    assert s.indexed == 3 and set(rows) == {"astronaut.jpg", "coffee.jpg", "rocket.jpg"}
    assert rows["astronaut.jpg"]["caption"] == "a woman in a space suit"
    assert json.loads(rows["astronaut.jpg"]["extra"]) == {"label": "person"}
    assert rows["coffee.jpg"]["caption"] is None and json.loads(rows["coffee.jpg"]["extra"]) == {"label": "drink"}
    assert rows["rocket.jpg"]["caption"] == "a rocket" and json.loads(rows["rocket.jpg"]["extra"]) == {"year": 2020}
    reasons = sorted(f.reason for f in s.failed)
    assert len(reasons) == 2 and reasons[0].startswith("bad JSON line") and "neither" in reasons[1]
    assert s.skipped == 0  # the parquet lists astronaut.jpg again: the same source, listed once


def test_directory_captions_and_symlink_loops(tmp_path, photos, tiny_clip):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    photos["astronaut"].save(src / "sub" / "ASTRO.PNG")
    (src / "sub" / "ASTRO.txt").write_text("An astronaut.\nmore text\n")
    photos["coffee"].save(src / "coffee.webp")
    (src / "notes.md").write_text("# not an image")
    os.symlink(src, src / "sub" / "loop")         # a loop: must terminate
    s = _index([src], tmp_path / "idx", [tiny_clip])
    rows = {Path(r["source"]).name: r for r in _all_rows(tmp_path / "idx")}
    assert set(rows) == {"ASTRO.PNG", "coffee.webp"} and s.failed == []
    assert rows["ASTRO.PNG"]["caption"] == "An astronaut."


def test_webdataset_tar(tmp_path, photos, tiny_clip):
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i, n in enumerate(["astronaut", "coffee", "rocket"]):
            for ext, data in ((".jpg", _jpeg(photos[n])), (".txt", f"caption {n}".encode()),
                              (".json", json.dumps({"key": f"{i:09d}", "url": f"http://x/{n}"}).encode())):
                info = tarfile.TarInfo(f"{i:09d}{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("000000003.jpg")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"12345"))
    out = tmp_path / "idx"
    s = _index([tar_path], out, [tiny_clip])
    assert s.indexed == 3 and [f.source for f in s.failed] == [f"{tar_path}#000000003.jpg"]
    rows = sorted(_all_rows(out), key=lambda r: r["source"])
    assert [r["source"] for r in rows] == [f"{tar_path}#{i:09d}.jpg" for i in range(3)]
    assert [r["caption"] for r in rows] == ["caption astronaut", "caption coffee", "caption rocket"]
    assert json.loads(rows[1]["extra"]) == {"key": "000000001", "url": "http://x/coffee"}
    assert rows[0]["path"] is None and rows[0]["id"] == store.content_id(store.sha256_bytes(_jpeg(photos["astronaut"])))
    assert _index([tar_path], out, [tiny_clip]).indexed == 0


def _jpeg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_url_sources_need_allow_download(tmp_path, photo_dir, tiny_clip):
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(photo_dir), **kw)  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/astronaut.jpg"
        (tmp_path / "urls.jsonl").write_text(json.dumps({"url": url, "caption": "remote"}) + "\n")
        s = _index([tmp_path / "urls.jsonl"], tmp_path / "idx", [tiny_clip])
        assert s.indexed == 0 and s.failed[0].source == url and "--allow-download" in s.failed[0].reason
        s = _index([tmp_path / "urls.jsonl"], tmp_path / "idx", [tiny_clip], allow_download=True)
        assert s.indexed == 1
        row = _all_rows(tmp_path / "idx")[0]
        assert row["source"] == url and row["path"] is None and row["caption"] == "remote"
        assert row["id"] == store.content_id(store.sha256_bytes((photo_dir / "astronaut.jpg").read_bytes()))
    finally:
        server.shutdown()
