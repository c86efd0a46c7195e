"""The GPU decode path (nvJPEG via torchvision) matches the CPU transforms closely.

Runs the same code with ``device="cpu"`` here (torchvision's CPU JPEG decoder); on a CUDA machine the
benchmark exercises the GPU."""

from __future__ import annotations

import io

import numpy as np
import torch

from indexer.gpu_decode import GpuTransformConfig, decode_batch, is_jpeg
from retrieval.encoders import get_spec


def _jpeg(img, quality=92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_config_from_registry():
    clip = GpuTransformConfig.from_spec(get_spec("clip-vit-b-32"))
    assert (clip.resize, clip.crop) == (224, 224)
    eff = GpuTransformConfig.from_spec(get_spec("effnet-lite0"))
    assert (eff.resize, eff.crop) == (256, 224) and eff.mean == (0.5, 0.5, 0.5)
    dino = GpuTransformConfig.from_spec(get_spec("dinov2-small"))
    assert (dino.resize, dino.crop) == (256, 224)


def test_decode_batch_matches_cpu_preprocess(effnet, photos):
    from PIL import Image

    imgs = [photos["chelsea"], photos["coffee"], photos["astronaut"]]
    blobs = [_jpeg(im) for im in imgs] + [b"\x89PNG not a jpeg"]
    cfg = GpuTransformConfig.from_spec(effnet.spec)
    batch, ok, failed = decode_batch(blobs, cfg, "cpu")
    assert ok == [0, 1, 2] and failed == [3]
    assert batch.shape == (3, 3, 224, 224)
    ref = torch.stack([effnet.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[:3]])
    # different resampling implementations: close, not identical
    assert float((batch - ref).abs().mean()) < 0.03
    a, b = effnet.encode_images(batch), effnet.encode_images(ref)
    cos = (a * b).sum(1)
    assert np.all(cos > 0.98), cos


def test_colour_names_gets_whole_images_in_0_1(photos):
    """--decode gpu for colour-names: the whole image, squashed, pixels in [0, 1] (not a normalised crop),
    so its colour distributions match the CPU path's."""
    from PIL import Image

    from retrieval.encoders import create_encoder

    enc = create_encoder("colour-names", device="cpu")
    cfg = GpuTransformConfig.from_spec(enc.spec)
    assert cfg.squash and (cfg.crop, cfg.mean, cfg.std) == (64, (0.0,) * 3, (1.0,) * 3)
    imgs = [photos["chelsea"], photos["coffee"]]
    blobs = [_jpeg(im) for im in imgs]
    batch, ok, _ = decode_batch(blobs, cfg, "cpu")
    assert ok == [0, 1] and batch.shape == (2, 3, 64, 64) and 0.0 <= float(batch.min()) <= float(batch.max()) <= 1.0
    cpu = enc.distributions([Image.open(io.BytesIO(b)).convert("RGB") for b in blobs])
    np.testing.assert_allclose(enc.distributions(batch), cpu, atol=0.02)


def test_bad_jpeg_falls_back(photos):
    good = _jpeg(photos["coffee"])
    bad = good[:200]  # truncated: the decoder fails, the caller decodes on the CPU (and reports it)
    cfg = GpuTransformConfig(224, 224, (0.5,) * 3, (0.5,) * 3)
    batch, ok, failed = decode_batch([good, bad], cfg, "cpu")
    assert 0 in ok and sorted(ok + failed) == [0, 1]  # every input accounted for exactly once
    assert is_jpeg(good) and not is_jpeg(b"GIF89a")
    assert batch is not None and batch.shape[1:] == (3, 224, 224)


def test_small_images_are_padded_to_crop():
    from PIL import Image

    cfg = GpuTransformConfig(224, 224, (0.5,) * 3, (0.5,) * 3)
    batch, ok, _ = decode_batch([_jpeg(Image.new("RGB", (30, 10), (200, 10, 10)))], cfg, "cpu")
    assert ok == [0] and batch.shape == (1, 3, 224, 224)
