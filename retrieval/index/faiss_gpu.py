"""An optimized IVF-PQ layout searched on the GPU by faiss's own GPU index (the ``gpu`` extra).

With ``--device cuda`` (or ``auto`` on a machine with a GPU) an encoder whose write shards are all exact
(flat) is searched exactly with torch (:mod:`retrieval.index.torch_search`): that needs the vectors on
the GPU, as float32 or float16. A collection that does not fit there (100M x 512-d is 100 GB in float16),
or whose write shards are compressed, is searched through its ``ivfpq`` / ``ivfpq-pca`` layout; when the
installed faiss has GPU support, ``ShardSet`` copies that layout to the GPU once with
``faiss.index_cpu_to_gpu`` (32 bytes a vector at ``PQ32x8``: 100M vectors are 3.2 GB), and each search of
the layout scans its lists there. Only the candidate search moves: the ``k * k_factor`` candidates are
re-scored exactly from the stored vectors on the CPU as before (``LayoutSearcher``), so the answer is the
CPU answer up to the order of near-ties among the candidates the GPU returns.

What stays on the CPU, searched by the same layout's CPU index:
* a filtered search, or any search of a layout with rows pruned since the optimize (an id selector masks
  them): faiss's GPU indexes take selectors only in some builds;
* a search asking for more than ``GPU_MAX_K`` candidates or lists (faiss's GPU k-selection limit);
* any GPU error (out of memory, an unsupported PQ size): logged once, the search is retried on the CPU.
A ``uncentred``/``PCA`` projection (``ivfpq-pca``) stays a CPU ``IndexPreTransform`` around the GPU IVF-PQ
(faiss clones it that way); queries are projected on the CPU, a 512 x 128 product.

HNSW and RaBitQ layouts have no faiss GPU counterpart that reads them (CAGRA is a different graph, built on
the GPU from the vectors); they stay on the CPU. Checked here on the CPU only: faiss-cpu has no GPU code, so
the tests swap in a stand-in for ``index_cpu_to_gpu``; the real path waits for a GPU machine
(benchmarks/RESULTS.md).
"""

from __future__ import annotations

import logging
import threading

import numpy as np

log = logging.getLogger(__name__)

GPU_MAX_K = 2048          # faiss GPU_MAX_SELECTION_K: the most candidates (and lists probed) one GPU search takes
GPU_LAYOUTS = ("ivfpq", "ivfpq-pca")


def gpu_number(device: str) -> int:
    """``cuda`` → 0, ``cuda:N`` → N."""
    _, _, number = str(device).partition(":")
    return int(number) if number.isdigit() else 0


class GpuLayoutIndex:
    """A faiss GPU copy of a layout's IVF-PQ index (see the module docstring)."""

    def __init__(self, index, device: str = "cuda"):
        import faiss

        ivf = faiss.extract_index_ivf(index)
        self.nlist = int(ivf.nlist)
        self.pretransform = isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
        self.device = gpu_number(device)
        self.resources = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        # IVF-PQ distance tables in float16: a PQ64x8 table in float32 (64 x 256 x 4 B) passes the shared
        # memory of one thread block; the candidates are re-scored exactly anyway
        options.useFloat16 = True
        self.index = faiss.index_cpu_to_gpu(self.resources, self.device, index, options)
        self._failed = False
        self._lock = threading.Lock()

    def usable(self, fetch: int, nprobe: int, selector) -> bool:
        return not self._failed and selector is None and fetch <= GPU_MAX_K and min(nprobe, self.nlist) <= GPU_MAX_K

    def params(self, nprobe: int):
        import faiss

        ivf = faiss.SearchParametersIVF(nprobe=max(1, min(int(nprobe), self.nlist)))
        if not self.pretransform:
            return ivf
        wrapped = faiss.SearchParametersPreTransform(index_params=ivf)
        wrapped._keep = ivf
        return wrapped

    def search(self, queries: np.ndarray, fetch: int, nprobe: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, layout rows) of the top ``fetch`` candidates, or None when the GPU failed (the caller
        searches on the CPU; later searches go there too)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        try:
            with self._lock:               # one search at a time on the GPU's scratch memory
                return self.index.search(q, int(fetch), params=self.params(nprobe))
        except (RuntimeError, MemoryError) as exc:
            self._failed = True
            log.warning("searching the layout on GPU %d failed (%s); searching it on the CPU from now on",
                        self.device, str(exc).splitlines()[0][:200])
            return None


def layout_to_gpu(layout, device: str) -> GpuLayoutIndex | None:
    """``layout`` (a ``LayoutSearcher``) copied to the GPU when its type can go there, else None (logged)."""
    if layout.entry.index_type not in GPU_LAYOUTS:
        log.info("%s layouts have no faiss GPU index; searching it on the CPU", layout.entry.index_type)
        return None
    try:
        return GpuLayoutIndex(layout.index, device)
    except (RuntimeError, MemoryError) as exc:
        log.warning("the %s layout could not be copied to %s (%s); searching it on the CPU",
                    layout.entry.index_type, device, str(exc).splitlines()[0][:200])
        return None
