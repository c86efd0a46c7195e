"""PDQ perceptual hash (Meta, ThreatExchange) through the optional ``pdqhash`` extra.

A 256-bit hash per image. ``encode_images`` returns the bits as a ±1/16 float32 vector, so the inner
product of two rows is ``1 - 2 * hamming / 256`` and PDQ plugs into any cosine index; ``hash_bits``
returns the packed 32-byte codes for a FAISS binary (Hamming) index.
"""

from __future__ import annotations

import numpy as np

from retrieval.encoders.base import Encoder, SquareResize
from retrieval.encoders.weights import missing_extra
from retrieval.numeric import pack_signs
from retrieval.types import Vectors


class PdqEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        try:
            import pdqhash
        except ImportError as exc:
            raise missing_extra(spec.name, spec.extra or "pdq", "pdqhash") from exc
        self._pdq = pdqhash
        self.preprocess = SquareResize(spec.image_size)   # PDQ downsamples to 64x64 internally anyway

    def hash_bool(self, batch) -> np.ndarray:
        """[n, 256] bool hashes (PDQ's quality score is not kept)."""
        arr = self.uint8_pixels(batch)
        return np.stack([np.asarray(self._pdq.compute(np.ascontiguousarray(a))[0], dtype=bool) for a in arr])

    def hash_bits(self, batch) -> np.ndarray:
        """[n, 32] uint8 packed codes for ``faiss.IndexBinaryFlat(256)``."""
        return pack_signs(self.hash_bool(batch))

    def encode_images(self, batch) -> Vectors:
        bits = self.hash_bool(batch)
        return np.where(bits, 1.0, -1.0).astype(np.float32) / np.float32(np.sqrt(bits.shape[1]))
