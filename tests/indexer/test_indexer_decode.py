"""The indexer's decode stage (``indexer.decode``): uint8 transfer and device-side normalisation, the
GPU JPEG path, worker crashes, and the cap on decoded batches in flight."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _indexer_helpers import all_rows, index  # tests/ is on sys.path
from PIL import Image

from indexer import decode
from indexer.decode import batch_bytes, iter_batches, prefetch_factor
from indexer.embed import gpu_decodable
from indexer.pipeline import _use_gpu_decode, stored_vectors
from retrieval import settings

_index, _all_rows = index, all_rows


def test_uint8_transfer_matches_the_encoders_preprocess(photos, tiny_clip, effnet, tiny_dino):
    import torch

    from indexer.decode import normalize, split_transform
    from retrieval.encoders import create_encoder

    img = photos["coffee"]
    for enc in (create_encoder(tiny_clip, device="cpu"), effnet):
        head, stats = split_transform(enc.preprocess)
        assert stats is not None
        small = head(img)
        assert small.dtype == torch.uint8 and small.shape[0] == 3
        assert torch.equal(normalize(small[None], stats, torch.device("cpu"))[0], enc.preprocess(img))
    dino = create_encoder(tiny_dino, device="cpu")
    assert split_transform(dino.preprocess) == (dino.preprocess, None)   # not a ToTensor+Normalize compose


def test_gpu_decode_path_matches_cpu_path(tmp_path, photos, tiny_clip, monkeypatch):
    """``--decode gpu`` runs here with torchvision's CPU JPEG decoder: same images, same ids, close vectors;
    EXIF-rotated, truncated, PNG and CMYK files take the CPU path and come out as on it."""
    src = tmp_path / "src"
    src.mkdir()
    for n in ("astronaut", "coffee", "rocket", "chelsea"):
        photos[n].save(src / f"{n}.jpg", quality=92)
    photos["camera"].save(src / "camera.png")
    photos["astronaut"].convert("CMYK").save(src / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    photos["coffee"].resize((96, 64)).save(src / "rotated.jpg", exif=exif)
    data = (src / "rocket.jpg").read_bytes()
    (src / "truncated.jpg").write_bytes(data[: len(data) // 2])
    import indexer.gpu_decode as gd

    blobs_seen = []
    real = gd.decode_batch
    monkeypatch.setattr(gd, "decode_batch", lambda blobs, *a, **kw: blobs_seen.extend(blobs) or real(blobs, *a, **kw))
    cpu = _index([src], tmp_path / "cpu", [tiny_clip], batch_size=3)
    assert blobs_seen == []
    gpu = _index([src], tmp_path / "gpu", [tiny_clip], batch_size=3, decode="gpu")
    # only the four plain JPEGs went to the batched decoder
    plain = ("astronaut", "coffee", "rocket", "chelsea")
    assert sorted(blobs_seen) == sorted((src / f"{n}.jpg").read_bytes() for n in plain)
    assert (gpu.indexed, [f.source for f in gpu.failed]) == (cpu.indexed, [f.source for f in cpu.failed]) == (
        7, [str(src / "truncated.jpg")])
    rows_cpu = {r["id"]: r for r in _all_rows(tmp_path / "cpu")}
    rows_gpu = {r["id"]: r for r in _all_rows(tmp_path / "gpu")}
    assert rows_cpu.keys() == rows_gpu.keys()
    for i in rows_cpu:
        assert (rows_cpu[i]["width"], rows_cpu[i]["height"]) == (rows_gpu[i]["width"], rows_gpu[i]["height"])
    vc, ic = stored_vectors(tmp_path / "cpu", tiny_clip)
    vg, ig = stored_vectors(tmp_path / "gpu", tiny_clip)
    vg = vg[[ig.index(i) for i in ic]]
    cos = np.sum(vc * vg, axis=1)
    assert np.all(cos > 0.97), cos
    cpu_path = {i for i, r in rows_cpu.items() if Path(r["source"]).name in ("camera.png", "cmyk.jpg", "rotated.jpg")}
    for k, i in enumerate(ic):   # files that take the CPU path give identical vectors
        if i in cpu_path:
            assert cos[k] > 0.99999
    # a JPEG the GPU decoder refuses is decoded on the CPU in the main process: same vectors as the CPU path
    monkeypatch.setattr(gd, "decode_batch", lambda blobs, *a, **kw: (None, [], list(range(len(blobs)))))
    fb = _index([src], tmp_path / "fallback", [tiny_clip], batch_size=3, decode="gpu")
    assert fb.indexed == 7 and [f.source for f in fb.failed] == [str(src / "truncated.jpg")]
    vf, i_f = stored_vectors(tmp_path / "fallback", tiny_clip)
    np.testing.assert_allclose(vf[[i_f.index(i) for i in ic]], vc, atol=1e-6)


def test_gpu_decode_with_colour_names(tmp_path, photos, tiny_clip):
    """--decode gpu with a second transform (colour-names: the whole image in [0, 1]) next to CLIP: both
    encoders' vectors stay close to the CPU path's, PNGs (CPU path) identical."""
    src = tmp_path / "src"
    src.mkdir()
    for n in ("astronaut", "coffee", "rocket"):
        photos[n].save(src / f"{n}.jpg", quality=92)
    photos["camera"].save(src / "camera.png")
    encoders = [tiny_clip, "colour-names"]
    assert _index([src], tmp_path / "cpu", encoders, batch_size=2).indexed == 4
    assert _index([src], tmp_path / "gpu", encoders, batch_size=2, decode="gpu").indexed == 4
    for name, floor in ((tiny_clip, 0.97), ("colour-names", 0.995)):
        vc, ic = stored_vectors(tmp_path / "cpu", name)
        vg, ig = stored_vectors(tmp_path / "gpu", name)
        cos = np.sum(vc * vg[[ig.index(i) for i in ic]], axis=1)
        assert np.all(cos > floor), (name, cos)


def test_a_file_that_kills_its_worker_is_skipped(tmp_path, photos, tiny_clip, monkeypatch):
    """A decoder crash (simulated: SIGKILL inside the worker for one file) costs that file only."""
    import signal

    src = tmp_path / "src"
    src.mkdir()
    names = [n for n in photos if n != "cat"][:7]
    for n in names:
        photos[n].resize((48, 48)).save(src / f"{n}.png")
    victim = (src / f"{names[3]}.png").read_bytes()
    real = decode.load_image

    def crashing_load(data, **kw):
        if bytes(data) == victim:
            os.kill(os.getpid(), signal.SIGKILL)   # runs in the DataLoader worker
        return real(data, **kw)

    monkeypatch.setattr(decode, "load_image", crashing_load)
    s = _index([src], tmp_path / "idx", [tiny_clip], workers=1, batch_size=2)
    assert [(Path(f.source).name, f.reason) for f in s.failed] == [(f"{names[3]}.png", decode.WORKER_CRASH)]
    assert s.indexed == 6
    assert sorted(Path(r["source"]).name for r in _all_rows(tmp_path / "idx")) == sorted(
        f"{n}.png" for n in names if n != names[3])


def test_worker_death_is_recognised_in_every_form():
    """A worker killed mid-transfer surfaces as a reset connection, not only as DataLoader's RuntimeError."""
    from indexer.decode import _worker_died

    assert _worker_died(RuntimeError("DataLoader worker (pid 12) is killed by signal: Killed."))
    assert _worker_died(ConnectionResetError(104, "Connection reset by peer"))
    assert _worker_died(EOFError())
    assert not _worker_died(RuntimeError("CUDA out of memory"))


def _enc(size):
    return SimpleNamespace(spec=SimpleNamespace(image_size=size))


def test_prefetch_factor_caps_bytes_in_flight(monkeypatch):
    monkeypatch.delenv("LOUPE_IN_FLIGHT_MB", raising=False)
    budget = settings.in_flight_bytes()
    one = 256 * 3 * 224 * 224                         # a batch of 256 uint8 images at 224 px
    assert prefetch_factor(one, 0) is None            # no workers: no prefetching
    assert prefetch_factor(10_000, 1) == 4            # small batches: the DataLoader's usual depth
    assert prefetch_factor(one, 15) == 1              # 15 workers × 38.5 MB: one batch each
    assert prefetch_factor(one, 7) == budget // (7 * one) == 3
    for workers in (1, 3, 7, 15, 31):
        depth = prefetch_factor(one, workers)
        assert 1 <= depth <= 4
        assert depth == 1 or workers * depth * one <= budget


def test_in_flight_budget_is_read_at_call_time(monkeypatch):
    one = 256 * 3 * 224 * 224
    monkeypatch.setenv("LOUPE_IN_FLIGHT_MB", "4096")
    assert prefetch_factor(one, 7) == 4
    monkeypatch.setenv("LOUPE_IN_FLIGHT_MB", "100")
    assert prefetch_factor(one, 7) == 1


def test_batch_bytes_counts_every_encoder_input():
    encs = {"a": _enc(224), "b": _enc(336)}
    assert batch_bytes(encs, 8, gpu_decode=False) == 8 * 3 * (224 ** 2 + 336 ** 2)
    assert batch_bytes(encs, 8, gpu_decode=True) < batch_bytes(encs, 8, gpu_decode=False)


@pytest.mark.parametrize("depth", [1, 3])
def test_iter_batches_passes_the_depth_to_the_loader(monkeypatch, depth):
    seen = []
    real = torch.utils.data.DataLoader

    def spy(*args, **kw):
        seen.append(kw["prefetch_factor"])
        return real(*args, **{**kw, "num_workers": 0, "prefetch_factor": None, "worker_init_fn": None})

    monkeypatch.setattr(decode.torch.utils.data, "DataLoader", spy)
    monkeypatch.setattr(decode, "collate", lambda batch: {"records": list(batch)})
    batches = list(iter_batches(list(range(5)), batch_size=2, workers=2, pin=False, prefetch=depth))
    assert [b["records"] for b in batches] == [[0, 1], [2, 3], [4]]
    assert seen == [depth]


def test_which_encoders_the_gpu_decoder_can_feed(effnet):
    """--decode gpu stands in for resize/crop/normalise transforms and colour-names; PDQ and SSCD take uint8
    HWC inputs, so with them the run decodes on the CPU. PDQ and SSCD are built from their registry specs
    and real transforms without their models, so the check runs whether or not their extras are installed."""
    from indexer.embed import Embedder
    from retrieval.device import resolve_device
    from retrieval.encoders import create_encoder, get_spec
    from retrieval.encoders.base import Encoder
    from retrieval.encoders.base import SquareResize as PdqTransform  # PDQ's and SSCD's transform
    from retrieval.encoders.base import SquareResize as SscdTransform

    def without_model(name, transform):
        enc = Encoder(get_spec(name), resolve_device("cpu"))
        enc.preprocess = transform(enc.spec.image_size)
        return enc

    encoders = {"effnet-lite0": effnet, "colour-names": create_encoder("colour-names", device="cpu"),
                "pdq": without_model("pdq", PdqTransform), "sscd": without_model("sscd", SscdTransform)}
    embedder = Embedder(encoders, {})
    got = {n: gpu_decodable(n, e, embedder.stats, embedder.group_of) for n, e in encoders.items()}
    assert got == {"effnet-lite0": True, "colour-names": True, "pdq": False, "sscd": False}
    # and so a run with PDQ next to a GPU-decodable encoder decodes on the CPU (not in the GPU's JPEG path)
    assert not _use_gpu_decode(SimpleNamespace(decode="gpu"), embedder)
    del encoders["pdq"], encoders["sscd"]
    assert _use_gpu_decode(SimpleNamespace(decode="gpu"), Embedder(encoders, {}))


def test_large_photos_are_decoded_reduced_and_keep_their_own_size(tmp_path, photos, effnet, monkeypatch):
    """A 12-megapixel JPEG is decoded by the JPEG decoder at a reduced scale (what the encoder needs, as a
    query upload is), its vector equals the library's own ``encode_images`` of the file, and the metadata
    keep the picture's own width and height (EXIF orientation applied)."""
    src = tmp_path / "src"
    src.mkdir()
    big = photos["astronaut"].resize((4000, 3000))
    big.save(src / "big.jpg", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # stored landscape, shown portrait
    big.save(src / "turned.jpg", quality=90, exif=exif)
    photos["coffee"].save(src / "small.jpg", quality=90)
    sizes = []
    real = decode.load_image

    def spy(data, **kw):
        img = real(data, **kw)
        sizes.append(img.size)
        return img

    monkeypatch.setattr(decode, "load_image", spy)
    assert _index([src], tmp_path / "out", ["effnet-lite0"]).indexed == 3
    # decoded at half scale (the shorter side stays >= 1024 px, retrieval.images.MIN_REDUCED_SIDE)
    assert sorted(sizes) == sorted([(2000, 1500), (1500, 2000), photos["coffee"].size]), sizes
    rows = {Path(r["path"]).name: r for r in _all_rows(tmp_path / "out")}
    assert (rows["big.jpg"]["width"], rows["big.jpg"]["height"]) == (4000, 3000)
    assert (rows["turned.jpg"]["width"], rows["turned.jpg"]["height"]) == (3000, 4000)
    assert (rows["small.jpg"]["width"], rows["small.jpg"]["height"]) == photos["coffee"].size
    vecs, ids = stored_vectors(tmp_path / "out", "effnet-lite0")
    for name in ("big.jpg", "turned.jpg", "small.jpg"):
        ref = effnet.encode_images([src / name])[0]
        got = vecs[ids.index(rows[name]["id"])]
        assert float(got @ ref) > 0.9999, name
