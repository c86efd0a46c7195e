"""Small numeric helpers shared across Loupe, each defined once: unit rows, z-scores, sign bits and the
Hamming distance ↔ similarity scale of binary codes.

Pure functions over arrays (numpy; :func:`l2_normalize_torch` keeps a torch graph for gradients).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from retrieval.types import Vectors

if TYPE_CHECKING:  # torch is only needed by callers that pass tensors
    import torch

EPS = 1e-12  # the smallest norm / spread divided by: a zero row stays zero instead of becoming NaN


# -- unit length --------------------------------------------------------------------------------
def l2_normalize(x: npt.ArrayLike | torch.Tensor, eps: float = EPS) -> Vectors:
    """Rows (the last axis) to unit length, as float32 numpy; a torch tensor is detached and moved to
    the CPU first. Rows of norm below ``eps`` are divided by ``eps`` (zero rows stay zero)."""
    if not isinstance(x, np.ndarray) and hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


def unit_vector(v: npt.ArrayLike | torch.Tensor) -> npt.NDArray[np.float32]:
    """One vector (of any shape, flattened) to unit length: float32 ``[d]``."""
    if not isinstance(v, np.ndarray) and hasattr(v, "detach"):
        v = v.detach().float().cpu().numpy()
    return l2_normalize(np.asarray(v, dtype=np.float32).reshape(1, -1))[0]


def l2_normalize_torch(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Rows (the last axis) of a tensor to unit length, differentiably (the graph is kept: attribution
    back-propagates through it)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


# -- score lists --------------------------------------------------------------------------------
def zscore(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Standardise one list of scores (mean 0, std 1, float64); a constant list becomes all zeros."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    sd = float(x.std())
    return (x - x.mean()) / sd if sd > EPS else np.zeros_like(x)


# -- binary codes -------------------------------------------------------------------------------
def pack_signs(vectors: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Sign bits of rows, packed: ±1-style float (or bool) vectors ``[n, nbits]`` → uint8 codes
    ``[n, nbits / 8]`` (bit = value > 0, ``np.packbits`` layout, as PDQ's ``hash_bits``). Rows that are
    already packed (uint8) are returned as they are (contiguous)."""
    v = np.asarray(vectors)
    if v.dtype == np.uint8:
        return np.ascontiguousarray(v)
    return np.packbits(v > 0, axis=1)


def hamming_distance(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.unsignedinteger]:
    """Hamming distance of packed uint8 codes, matching rows (broadcast over leading axes) → ints."""
    return np.unpackbits(np.bitwise_xor(np.asarray(a), np.asarray(b)), axis=-1).sum(axis=-1)


def hamming_to_score(hamming: npt.ArrayLike, nbits: int) -> npt.NDArray[np.float32]:
    """Hamming distance ``h`` of ``nbits``-bit codes → similarity ``1 - 2 h / nbits`` in [-1, 1]: the
    cosine of the codes as ±1 vectors, so binary and float encoders share one threshold scale."""
    return (1.0 - 2.0 * np.asarray(hamming, dtype=np.float64) / nbits).astype(np.float32)


def score_to_max_hamming(threshold: float, nbits: int) -> int:
    """Largest Hamming distance whose score ``1 - 2h/nbits`` is still >= ``threshold`` (the inverse of
    :func:`hamming_to_score`, for range searches over binary codes)."""
    return int(np.floor((1.0 - float(threshold)) * nbits / 2.0 + 1e-9))


__all__ = ["EPS", "l2_normalize", "unit_vector", "l2_normalize_torch", "zscore", "pack_signs",
           "hamming_distance", "hamming_to_score", "score_to_max_hamming"]
