"""Exact search on an accelerator with torch: one matrix multiply and a top-k.

When the engine runs with ``--device cuda`` and the installed faiss has no GPU support (the ``gpu`` extra
is not installed), the flat (exact) vectors of an encoder are copied once to the GPU and each batch of
queries is ``scores = Q @ V.T`` followed by ``topk``, block by block over the rows (the score buffer stays
under ``SCORE_BYTES``). The copy is float32 when it fits in half the GPU's free memory, else float16.
Either way the matmul is not trusted for the final order (float16 rounds, and a float32 matmul may run in
TF32 on the GPU), so the top ``k * OVERSAMPLE + PAD`` candidates are re-scored in float32 — on the GPU
from the float32 copy, or on the CPU from the stored vectors for a float16 copy — and the final top-k is
taken on those exact scores: for exact indexes the answer is the CPU answer (tested on the CPU, where the
path is the same code). Filters are a boolean mask over the global rows (rows outside get ``-inf`` before
the top-k). Measured on an H200 at 1M x 512-d (benchmarks/RESULTS.md, issue 14 part 5): faiss-cpu on 16
threads 161 queries/s in a batch of 1,000; this searcher 28,751 with the float32 copy, 9,493 with a float16
one (its CPU re-scoring is most of that time); one query through the engine 0.871 ms against 52.676 ms.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

OVERSAMPLE = 2
PAD = 16
SCORE_BYTES = 1 << 30         # the [nq, block] score buffer of one matmul block: at most this many bytes
MIN_BLOCK_ROWS = 4096         # ... but never fewer rows than this per block (a tiny matmul wastes the GPU)
RESCORE_ROWS = 1 << 16        # candidate vectors gathered per re-scoring step (64k x 512-d float32 = 128 MB)
FP32_SHARE = 0.5              # a float32 copy when it takes at most this share of the GPU's free memory


def block_rows(nq: int, element_size: int, budget: int | None = None) -> int:
    """Rows of the collection scored per matmul: the ``[nq, rows]`` buffer stays within ``budget`` bytes.
    A batch of 4,096 queries against 1M rows in one block would need 8 GB of float16 scores: a 24 GB GPU
    holding the vectors and that buffer would run out of memory, so large batches go through in blocks."""
    return max(MIN_BLOCK_ROWS, (SCORE_BYTES if budget is None else budget) // max(1, nq * element_size))


class TorchFlatSearcher:
    """Exact inner-product top-k over ``chunks`` (consecutive blocks of float32 vectors, e.g. one per shard)."""

    def __init__(self, chunks: Sequence[np.ndarray], device: str = "cuda", *, half: bool | None = None,
                 exact_vectors: Callable[[np.ndarray], np.ndarray] | None = None, rescore: bool | None = None):
        import torch

        self.torch = torch
        self.device = torch.device(device)
        dim = next((c.shape[1] for c in chunks if np.ndim(c) == 2), 0)
        rows = sum(len(c) for c in chunks)
        self.half = (self.device.type == "cuda" and not fits_float32(rows * dim * 4, self.device)) \
            if half is None else half
        dtype = torch.float16 if self.half else torch.float32
        self.matrix = torch.empty((rows, dim), dtype=dtype, device=self.device)   # filled in place: no 2x peak
        at = 0
        for c in chunks:
            if len(c):
                self.matrix[at:at + len(c)] = torch.from_numpy(np.ascontiguousarray(c, dtype=np.float32)).to(
                    self.device, dtype)
                at += len(c)
        self.count = rows
        # candidates are re-scored in float32 unless the matmul itself is exact (float32 on the CPU)
        self.rescore = (self.half or self.device.type != "cpu") if rescore is None else rescore
        # float32 copies for re-scoring come from the caller (the memory-mapped shards) when half precision
        self._exact = exact_vectors

    @property
    def nbytes(self) -> int:
        return int(self.matrix.element_size() * self.matrix.nelement())

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores [nq, k] float32, global rows [nq, k] int64; -1 / -inf where fewer than k rows qualify)."""
        torch = self.torch
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        nq = len(q)
        out_d = np.full((nq, k), -np.inf, dtype=np.float32)
        out_i = np.full((nq, k), -1, dtype=np.int64)
        if self.count == 0 or k <= 0:
            return out_d, out_i
        fetch = min(self.count, k * OVERSAMPLE + PAD if self.rescore else k)
        qt = torch.from_numpy(q).to(self.device, self.matrix.dtype)
        mask_t = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=bool)).to(self.device)
        best_s, best_i = None, None
        step = block_rows(nq, self.matrix.element_size())
        with torch.no_grad():
            for a in range(0, self.count, step):
                block = self.matrix[a:a + step]
                scores = qt @ block.T                   # in the copy's dtype: no float32 copy of float16 scores
                if mask_t is not None:
                    scores = scores.masked_fill(~mask_t[a:a + step], float("-inf"))
                s, i = torch.topk(scores, min(fetch, block.shape[0]), dim=1)
                s = s.float()
                i = i + a
                if best_s is None:
                    best_s, best_i = s, i
                else:
                    s, pos = torch.topk(torch.cat([best_s, s], 1), min(fetch, best_s.shape[1] + s.shape[1]), dim=1)
                    best_i = torch.gather(torch.cat([best_i, i], 1), 1, pos)
                    best_s = s
            if self.rescore and not self.half:          # exact float32 scores where the copy is
                best_s = self._rescore_on_device(qt, best_s, best_i)
        scores = best_s.cpu().numpy().astype(np.float32)
        rows = best_i.cpu().numpy().astype(np.int64)
        rows[~np.isfinite(scores)] = -1
        if self.rescore and self.half:
            scores, rows = self._rescore(q, scores, rows)
        n = min(k, rows.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :n]
        out_d[:, :n] = np.take_along_axis(scores, order, 1)
        out_i[:, :n] = np.take_along_axis(rows, order, 1)
        out_i[~np.isfinite(out_d)] = -1
        return out_d, out_i

    def _rescore_on_device(self, qt, scores, rows):
        """Float32 dot products of each query with its candidates from the float32 copy (an elementwise
        product and a sum: exact float32 whatever the matmul precision), ``-inf`` kept where no candidate."""
        torch = self.torch
        out = torch.empty_like(scores)
        step = max(1, RESCORE_ROWS // max(1, rows.shape[1]))
        for a in range(0, len(qt), step):
            cand = self.matrix[rows[a:a + step]]                        # [n, fetch, d]
            out[a:a + step] = (cand * qt[a:a + step, None, :]).sum(-1)
        return out.masked_fill(~torch.isfinite(scores), float("-inf"))

    def _rescore(self, q: np.ndarray, scores: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Float32 scores of the float16 candidates (from the stored vectors, or the fp16 copy upcast),
        gathered for many queries at once (dedup sends 4,096 queries a batch: one gather per query was
        most of its time)."""
        exact = np.full_like(scores, -np.inf)
        step = max(1, RESCORE_ROWS // max(1, rows.shape[1]))
        for a in range(0, len(q), step):
            r = rows[a:a + step]
            valid = r >= 0
            if not valid.any():
                continue
            flat = r[valid]
            if self._exact is not None:
                vecs = np.asarray(self._exact(flat), dtype=np.float32)
            else:
                vecs = self.matrix[self.torch.from_numpy(flat).to(self.device)].float().cpu().numpy()
            which = np.nonzero(valid)[0]                 # the query of each candidate
            part = exact[a:a + step]
            part[valid] = np.einsum("ij,ij->i", vecs, q[a:a + step][which])
        return exact, rows


def fits_float32(nbytes: int, device) -> bool:
    """True when a float32 copy of ``nbytes`` takes at most ``FP32_SHARE`` of ``device``'s free memory."""
    import torch

    try:
        free, _ = torch.cuda.mem_get_info(device)
    except Exception:  # noqa: BLE001  (not a CUDA device, or no driver: float16, the smaller copy)
        return False
    return nbytes <= FP32_SHARE * free


def torch_device_available(device: str) -> bool:
    """True when torch can allocate on ``device`` (``cuda``, ``cuda:1``, ``mps``, ``cpu``)."""
    try:
        import torch

        if device.startswith("cuda"):
            return torch.cuda.is_available()
        if device == "mps":
            return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
        return device == "cpu"
    except Exception:  # noqa: BLE001
        return False
