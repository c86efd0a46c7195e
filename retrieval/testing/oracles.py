"""Reference implementations that tests and benchmarks check Loupe against (never used by the library)."""

from __future__ import annotations

import numpy as np

from retrieval.copydetect.dedup import Pairs, is_binary
from retrieval.numeric import hamming_to_score


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: one ``IndexFlatIP`` over all vectors."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def brute_force_pairs(vectors: np.ndarray, threshold: float) -> Pairs:
    """Reference implementation (dense matrix; tests only)."""
    v = np.asarray(vectors)
    if is_binary(v):
        bits = np.unpackbits(v, axis=1).astype(np.int32)
        ham = (bits[:, None, :] != bits[None, :, :]).sum(-1)
        sim = hamming_to_score(ham, bits.shape[1])
    else:
        sim = v.astype(np.float32) @ v.astype(np.float32).T
    a, b = np.nonzero(np.triu(sim >= np.float32(threshold), k=1))
    return Pairs(a.astype(np.int64), b.astype(np.int64), sim[a, b].astype(np.float32))
