"""PDQ perceptual hash (Meta, ThreatExchange) through the optional ``pdqhash`` extra.

A 256-bit hash per image. ``encode_images`` returns the bits as a ±1/16 float32 vector, so the inner
product of two rows is ``1 - 2 * hamming / 256`` and PDQ plugs into any cosine index; ``hash_bits``
returns the packed 32-byte codes for a FAISS binary (Hamming) index.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from retrieval.encoders.base import Encoder
from retrieval.encoders.weights import missing_extra
from retrieval.types import Vectors


class PdqTransform:
    """PIL → uint8 HWC tensor at a fixed size (PDQ downsamples to 64x64 internally anyway)."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = img.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8))


class PdqEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        try:
            import pdqhash
        except ImportError as exc:
            raise missing_extra(spec.name, spec.extra or "pdq", "pdqhash") from exc
        self._pdq = pdqhash
        self.preprocess = PdqTransform(spec.image_size)

    def _batch(self, batch) -> np.ndarray:
        if not isinstance(batch, torch.Tensor):
            from retrieval.images import load_image

            batch = torch.stack([self.preprocess(b if isinstance(b, Image.Image) else load_image(b)) for b in batch])
        return batch.cpu().numpy().astype(np.uint8)

    def hash_bool(self, batch) -> np.ndarray:
        """[n, 256] bool hashes, plus nothing else (quality is available via ``hash_quality``)."""
        arr = self._batch(batch)
        return np.stack([np.asarray(self._pdq.compute(np.ascontiguousarray(a))[0], dtype=bool) for a in arr])

    def hash_bits(self, batch) -> np.ndarray:
        """[n, 32] uint8 packed codes for ``faiss.IndexBinaryFlat(256)``."""
        return np.packbits(self.hash_bool(batch), axis=1)

    def encode_images(self, batch) -> Vectors:
        bits = self.hash_bool(batch)
        return np.where(bits, 1.0, -1.0).astype(np.float32) / np.float32(np.sqrt(bits.shape[1]))
