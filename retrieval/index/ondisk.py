"""IVF layouts whose inverted lists live on disk, memory-mapped: built the way the LAION indexes were.

``loupe optimize`` builds an ``ivfpq`` layout (:mod:`retrieval.index.optimize`) as faiss' ``contrib.ondisk``
does, so that the layout is never held whole in RAM, neither while it is built nor while it is searched:

1. **one** coarse quantizer + PQ codebooks are trained on a sample of the collection (``trained``);
2. each write shard's vectors are added to a copy of the trained, empty index — ids are their global row
   numbers — and that part is written to a scratch folder (RAM: one shard's codes at a time);
3. the parts are opened with ``IO_FLAG_MMAP`` and their inverted lists merged into one
   ``OnDiskInvertedLists`` file (``search-NNNNN.ivfdata``: codes + ids, list after list) by
   ``faiss.contrib.ondisk.merge_ondisk``; the index file proper (``search-NNNNN.faiss``: quantizer,
   codebooks, where each list lies in the data file) is small;
4. both files are written under temporary names, synced and renamed; the manifest that names them is
   written after (by the caller), so a crash at any point leaves the previous layout in place — and at
   most orphan files that the next ``optimize`` removes.

Opening (:func:`read_ondisk`) maps the data file read-only; its pages are read from disk as queries touch
them (``nprobe`` lists per query). The index file records the data file's name only (no folder), so an
index folder can be moved. Not ``IO_FLAG_MMAP`` / ``IO_FLAG_ONDISK_SAME_DIR`` at open: with faiss 1.15
the first skips mapping the data of an ``OnDiskInvertedLists`` (a search then crashes) and the second
prints to stdout (which would corrupt ``--json`` output); the file is mapped explicitly instead. Prefetching
is off (``prefetch_nthread = 0``): faiss' default starts 32 threads per search to read the probed lists
ahead, which cost 2.8 ms of a 0.47 ms single-query search (4,100 vectors, nprobe 32) when the pages are in
the page cache or on an SSD; the kernel reads a missing page when the search touches it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import store

log = logging.getLogger("loupe.optimize")

ADD_BLOCK = 50_000            # vectors encoded per faiss call
DATA_SUFFIX = ".ivfdata"


def data_file_of(file: str) -> str:
    """``search-00003.faiss`` -> ``search-00003.ivfdata``."""
    return file[: -len(".faiss")] + DATA_SUFFIX


def build_ondisk(trained, blocks: Iterable[np.ndarray], path: Path, *,
                 progress: Callable[[int], None] | None = None) -> tuple[Any, dict[Path, dict[str, Any]]]:
    """Fill ``trained`` (an empty, trained IVF index) with every vector of ``blocks`` (consecutive rows:
    one block per write shard), its inverted lists merged on disk; write ``path`` (``.faiss``) and its data
    file (``.ivfdata`` beside it). Returns (the index, searchable now, its lists mapped from the data file;
    ``{path: record}`` of the two files for ``Manifest.record_all``)."""
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    if faiss.try_extract_index_ivf(trained) is None or not trained.is_trained or trained.ntotal:
        raise ValueError("build_ondisk needs an empty, trained IVF index")
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    data_path = path.with_name(data_file_of(path.name))
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.parts-", dir=folder))
    records: dict[Path, dict[str, Any]] = {}
    try:
        parts, offset = [], 0
        for number, block in enumerate(blocks):
            block = np.asarray(block)
            if not len(block):
                continue
            part = faiss.clone_index(trained)
            for a in range(0, len(block), ADD_BLOCK):
                chunk = np.ascontiguousarray(block[a:a + ADD_BLOCK], dtype=np.float32)
                part.add_with_ids(chunk, np.arange(offset + a, offset + a + len(chunk), dtype=np.int64))
                if progress is not None:
                    progress(offset + a + len(chunk))
            offset += len(block)
            parts.append(str(scratch / f"part-{number:06d}.faiss"))
            faiss.write_index(part, parts[-1])
            del part, block
        merged = faiss.clone_index(trained)
        fd, tmp = tempfile.mkstemp(prefix=f".{data_path.name}.", suffix=".tmp", dir=folder)
        os.close(fd)
        try:
            if parts:
                with _stdout_to_stderr():             # faiss prints "resizing ..." with printf
                    merge_ondisk(merged, parts, tmp)
            else:                                     # an empty collection: an empty data file
                invlists = faiss.OnDiskInvertedLists(faiss.extract_index_ivf(merged).nlist,
                                                     faiss.extract_index_ivf(merged).code_size, tmp)
                faiss.extract_index_ivf(merged).replace_invlists(invlists, True)
                invlists.this.disown()
            lists = ondisk_lists(merged)
            lists.filename = data_path.name           # the name only: the data file sits beside the index
            lists.prefetch_nthread = 0
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
                fh.seek(0)
                records[data_path] = store.file_record(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, data_path)                # the merged index keeps its mapping of the renamed file
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        records[path] = store.atomic_write_with(path, lambda t: faiss.write_index(merged, str(t)))
        return merged, records
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def _stdout_to_stderr():
    """C-level writes to stdout go to stderr meanwhile (stdout carries the commands' JSON)."""
    import ctypes

    sys.stdout.flush()
    libc = ctypes.CDLL(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ondisk_lists(index):
    """The ``OnDiskInvertedLists`` of an IVF index, or ``None``."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def read_ondisk(path: Path, data_path: Path):
    """Open an on-disk IVF index: the index file read, its data file (``data_path``) mapped read-only.
    Raises ``IndexFormatError`` when either is unreadable, the index is not one, names another data file,
    or the data file is shorter than the lists it holds (a search would read past its end)."""
    import faiss

    path, data_path = Path(path), Path(data_path)
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    except (RuntimeError, MemoryError, AssertionError) as exc:
        raise IndexFormatError(f"search layout {path} is unreadable ({' '.join(str(exc).split())[-200:]}); "
                               "run `loupe optimize` again") from exc
    lists = ondisk_lists(index)
    if lists is None:
        raise IndexFormatError(f"search layout {path} is not an on-disk IVF index; run `loupe optimize` again")
    if Path(lists.filename).name != data_path.name:
        raise IndexFormatError(f"search layout {path} names data file {lists.filename!r}, not {data_path.name!r}; "
                               "run `loupe optimize` again")
    try:
        size = os.stat(data_path).st_size
    except FileNotFoundError:
        raise IndexFormatError(f"missing search layout data {data_path}; run `loupe optimize` again") from None
    if size < lists.totsize:
        raise IndexFormatError(f"search layout data {data_path} is {size} bytes, shorter than the {lists.totsize} "
                               "its lists need (truncated?); run `loupe optimize` again")
    lists.filename = str(data_path.resolve())
    lists.read_only = True
    lists.prefetch_nthread = 0          # no prefetch threads started per search: see the module docstring
    if lists.totsize:
        lists.do_mmap()
    return index


def list_ids(index) -> np.ndarray:
    """Every id stored in the inverted lists of an IVF index (one pass over the lists), int64."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    out = []
    for number in range(ivf.nlist):
        size = lists.list_size(number)
        if size:
            ptr = lists.get_ids(number)
            out.append(faiss.rev_swig_ptr(ptr, size).copy())
            lists.release_ids(number, ptr)
    return np.concatenate(out).astype(np.int64) if out else np.zeros(0, np.int64)


def check_ids(index, count: int, path) -> None:
    """The lists hold each row number 0..count-1 exactly once (what a merge must give). Raises
    ``IndexFormatError``."""
    ids = list_ids(index)
    if len(ids) != count or (count and (ids.min() < 0 or ids.max() >= count
                                        or np.bincount(ids, minlength=count).max() != 1)):
        raise IndexFormatError(f"search layout {path}: its inverted lists do not hold rows 0..{count - 1} once each "
                               "(damaged); run `loupe optimize` again")


def data_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(f"search-*{DATA_SUFFIX}"))


def remove_orphans(folder: Path, keep: set[str]) -> list[str]:
    """Delete layout files of ``folder`` that no manifest names (``keep``: names to keep) — left by an
    ``optimize`` that crashed before its manifest was written — and its scratch folders / temporary files.
    The caller holds the index's writer lock."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for item in folder.iterdir():
        name = item.name
        stale_tmp = name.startswith(".search-")          # temporary files and scratch folders
        layout = name.startswith("search-") and (name.endswith(".faiss") or name.endswith(DATA_SUFFIX))
        if (stale_tmp or layout) and name not in keep:
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed.append(name)
    if removed:
        log.info("%s: removed %d files left by an interrupted optimize", folder, len(removed))
    return removed
