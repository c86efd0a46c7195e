"""FAISS vector shards of an index: write, read (memory-mapped where it pays), check against the manifest.

Part of the on-disk format (:mod:`retrieval.index.store` has the layout, the manifest and the atomic
writes): ``DIR/<encoder>/shard-NNNNN.faiss`` holds the shard's vectors, vector i <-> metadata row i.
``check_vectors`` is what opening an index checks (dimension, count, unit norms of exact float vectors).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index.store import REPAIR_HINT, EncoderEntry, Manifest, atomic_write_with, check_size, vectors_path

NORM_TOLERANCE = 1e-3          # |norm - 1| of a stored unit vector (float32 round-off is ~1e-7)


def write_vectors(index_dir, encoder: str, shard: str, index) -> dict[Path, dict[str, Any]]:
    """Write one shard's FAISS index; returns ``{path: record}`` for ``Manifest.record_all``."""
    import faiss

    path = vectors_path(index_dir, encoder, shard)
    if isinstance(index, faiss.IndexBinary):
        return {path: atomic_write_with(path, lambda tmp: faiss.write_index_binary(index, tmp))}
    return {path: atomic_write_with(path, lambda tmp: faiss.write_index(index, tmp))}


def read_vectors(index_dir, encoder: str, shard: str, *, mmap: bool = True, binary: bool = False,
                 manifest: Manifest | None = None):
    """Read a shard's FAISS index, memory-mapped where the index type allows (``mmap``). With the
    ``manifest``: the file's recorded size first, then (``check_vectors``) its dimension, count and, for
    flat float shards, unit norms. Raises ``IndexFormatError``."""
    import faiss

    path = str(vectors_path(index_dir, encoder, shard))
    if not os.path.isfile(path):
        raise IndexFormatError(f"missing vector shard {path}; the index is incomplete — rerun `loupe index`")
    check_size(index_dir, manifest, path)
    try:
        if binary:
            index = faiss.read_index_binary(path)
        else:
            index = None
            if mmap:
                try:
                    index = faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
                except RuntimeError:
                    pass
            if index is None:
                index = faiss.read_index(path)
    except (RuntimeError, MemoryError, AssertionError) as exc:   # a damaged header may ask for any size
        raise IndexFormatError(f"vector shard {path} is unreadable ({_faiss_reason(exc)}); {REPAIR_HINT}") from exc
    if manifest is not None:
        count = next((s.count for s in manifest.shards if s.name == shard), None)
        check_vectors(index, manifest.entry(encoder), count, path)
    return index


def _faiss_reason(exc: BaseException) -> str:
    """The useful part of a FAISS error ("Error in <signature> at <file>: Error: '<cond>' failed: <reason>")."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    reason = text.rsplit("failed: ", 1)[-1]
    return reason.replace(" (Success)", "")[:200]


def check_vectors(index, entry: EncoderEntry, count: int | None, path, *, norms: bool = True) -> None:
    """A shard's FAISS index agrees with its manifest entry: the encoder's dimension, ``count`` vectors,
    and (flat float shards of a normalised encoder, when ``norms``) unit vectors — a shard damaged in
    place, or another encoder's file, fails here. Raises ``IndexFormatError``."""
    import faiss

    binary = isinstance(index, faiss.IndexBinary)
    if binary != (entry.index_type == "binary"):
        raise IndexFormatError(f"vector shard {path} is {'a binary' if binary else 'a float'} index but encoder "
                               f"{entry.name} is {entry.index_type}; the file belongs to another index — {REPAIR_HINT}")
    if index.d != entry.dim:
        raise IndexFormatError(f"vector shard {path} holds {index.d}-d vectors but encoder {entry.name} is "
                               f"{entry.dim}-d; the file belongs to another encoder or index — {REPAIR_HINT}")
    if count is not None and index.ntotal != count:
        raise IndexFormatError(f"vector shard {path} holds {index.ntotal} vectors for {count} images; {REPAIR_HINT}")
    if norms and not binary and entry.normalized and entry.metric == "ip":
        bad = bad_norm_row(index)
        if bad is not None:
            raise IndexFormatError(f"vector shard {path}: vector {bad[0]} has norm {bad[1]:.4g}, not 1; the file "
                                   f"was damaged after indexing — {REPAIR_HINT}")


def flat_vectors(index) -> np.ndarray | None:
    """The stored vectors of an exact float index (``IndexFlat``, or an HNSW graph's flat storage), as a
    view (no copy); else ``None``."""
    import faiss

    if isinstance(index, faiss.IndexHNSW) and index.storage is not None:
        index = faiss.downcast_index(index.storage)
    if type(index) not in (faiss.IndexFlatIP, faiss.IndexFlatL2, faiss.IndexFlat) or index.ntotal == 0:
        return None
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def release_pages(index) -> bool:
    """Unmap the resident pages of a memory-mapped flat index's vectors (``madvise(MADV_DONTNEED)``: the
    next read maps them again from the page cache or the file), so that checking a mapped shard whole at
    open does not leave it resident. Returns whether it did (Linux, flat float storage)."""
    import ctypes
    import mmap as mmap_module

    import faiss

    storage = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    codes = getattr(storage, "codes", None)
    if getattr(codes, "is_owned", True):          # vectors in RAM (not mapped): MADV_DONTNEED would zero them
        return False
    vecs = flat_vectors(index)
    advice = getattr(mmap_module, "MADV_DONTNEED", None)
    if vecs is None or advice is None or not vecs.nbytes:
        return False
    page = mmap_module.PAGESIZE
    start = vecs.ctypes.data
    end = start + vecs.nbytes
    first, last = -(-start // page) * page, end // page * page     # whole pages inside the vectors only
    if last <= first:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), advice) == 0


def read_ahead(paths: Sequence[Path], stop: threading.Event, block: int = 8 << 20) -> None:
    """Read files into the page cache with large reads (a background thread at open: the re-scoring's first
    reads of cold mapped pages each wait for the disk; ``posix_fadvise(WILLNEED)`` reads only the first
    8 MB here); stops when ``stop`` is set or a file cannot be read."""
    buf = bytearray(block)
    for path in paths:
        try:
            with open(path, "rb", buffering=0) as fh:
                while not stop.is_set() and fh.readinto(buf):
                    pass
        except OSError:
            return


def check_rows(vecs: np.ndarray, rows, path) -> None:
    """``vecs`` (read from rows ``rows`` of the shard at ``path``) are unit vectors, else ``IndexFormatError``
    (a shard whose norms were not checked at open is checked where it is read: ``ShardSet``)."""
    bad = bad_norm_row(np.atleast_2d(vecs))
    if bad is not None:
        row = int(np.asarray(rows).reshape(-1)[bad[0]])
        raise IndexFormatError(f"vector shard {path}: vector {row} has norm {bad[1]:.4g}, not 1; the file was "
                               f"damaged after indexing — {REPAIR_HINT}")


def bad_norm_row(index, chunk: int = 65536) -> tuple[int, float] | None:
    """The first vector of a flat float index (or of an ``[n, d]`` array) whose norm is not 1
    (``NORM_TOLERANCE``), as (row, norm)."""
    vecs = index if isinstance(index, np.ndarray) else flat_vectors(index)
    if vecs is None:
        return None
    for start in range(0, len(vecs), chunk):
        part = vecs[start:start + chunk]
        with np.errstate(all="ignore"):
            norms = np.sqrt(np.einsum("ij,ij->i", part, part, dtype=np.float64))
        bad = ~(np.abs(norms - 1.0) <= NORM_TOLERANCE)      # NaN counts as bad
        if bad.any():
            row = int(np.argmax(bad))
            return start + row, float(norms[row])
    return None


def reconstruct_all(index) -> np.ndarray:
    """All vectors of a (flat) shard as float32 [n, d]; approximate for compressed indexes."""
    n = index.ntotal
    if n == 0:
        return np.zeros((0, index.d), dtype=np.float32)
    try:
        return index.reconstruct_n(0, n)
    except RuntimeError:
        import faiss

        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()
            return index.reconstruct_n(0, n)
        raise
