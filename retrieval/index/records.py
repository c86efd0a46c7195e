"""``RecordStore``: what an opened index holds about its images — ids, metadata, source files, local
features.

* An image id maps to ``(shard number, row)`` through a sorted array of the ids' integer values.
* Metadata rows come from the Parquet shards (``aliases`` and ``extra`` are JSON columns); an image's
  bytes from its source file, or from a webdataset tar member (``/abs/shard.tar#KEY.jpg``).
* Source files are read only while they still hold what was indexed: a regular file of the recorded
  ``size`` whose SHA-256 is the recorded ``sha256`` (rows without one: whose content id is the image id).
  The hash is computed once per file version (device, inode, size, mtime, ctime of the opened file) and
  remembered; the bytes served are read from the same open file that was checked. A file that was
  replaced, edited, or swapped for a symlink to something else is "gone" (``UnknownIdError``, 404),
  and error messages never name the path (it is logged).
* Local descriptors (re-ranking) come from ``descriptors.LocalShard`` (memory-mapped) and the PCA that reduced
  them from ``local-pca.npz``: both opened with the store, for every shard of the manifest version, so a
  store keeps answering after ``loupe index`` replaced or deleted those files (a timed commit deletes the
  previous version of the shard being filled; on Linux an open or mapped file outlives its name).
* ``masks(conditions)``: a metadata filter as one boolean array per shard (``retrieval.index.filters``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import IndexFormatError, UnknownIdError, UnsupportedModalityError
from retrieval.index import descriptors, store
from retrieval.index.filters import Condition, filter_mask, table_fields
from retrieval.types import Hit

log = logging.getLogger("loupe.index")

VERIFIED_CACHE_SIZE = 4096          # file versions whose content hash was checked
MAX_UNRECORDED_BYTES = 1 << 30      # a source without a recorded size is read up to this many bytes
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)   # a FIFO must not block
_CHUNK = 1 << 20


class RecordStore:
    """The metadata shards of an index, read once when the index is opened."""

    def __init__(self, index_dir: Path, manifest: store.Manifest):
        self.index_dir = index_dir
        self.manifest = manifest
        self.shard_names = [s.name for s in manifest.shards]
        self.tables = []
        for entry in manifest.shards:
            table = store.read_metadata(index_dir, entry.name, manifest)
            if table.num_rows != entry.count:
                raise IndexFormatError(
                    f"{entry.name}: metadata has {table.num_rows} rows, the manifest says {entry.count}; "
                    "rerun `loupe index` to repair the index")
            self.tables.append(table)
        counts = [t.num_rows for t in self.tables]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts else np.zeros(1, np.int64)
        self.shard_ids: list[list[str]] = [t.column("id").to_pylist() for t in self.tables]
        ints = np.array([store.id_to_int(i) for ids in self.shard_ids for i in ids], dtype=np.int64)
        self._id_order = np.argsort(ints, kind="stable")
        self._id_sorted = ints[self._id_order]
        self._extra_cache: list[dict] = [{} for _ in self.tables]
        self._local: dict[tuple[str, int], descriptors.LocalShard] = {}
        self._reducers: dict[str, descriptors.LocalReducer | None] = {}
        self._lock = threading.Lock()
        self._verified: OrderedDict[tuple, str] = OrderedDict()    # file version -> its sha256
        self._fields: frozenset[str] | None = None                  # filter_fields, once asked
        self._open_local()

    def _open_local(self) -> None:
        """Open (map) the local features of every shard and load the PCA of every encoder that has them."""
        for entry in self.manifest.encoders.values():
            if not entry.local_features:
                continue
            for i, shard in enumerate(self.shard_names):
                self._local[(entry.name, i)] = descriptors.LocalShard(self.index_dir, entry.name, shard, self.manifest)
            self._reducers[entry.name] = self._load_reducer(entry.name)

    def _load_reducer(self, encoder: str) -> descriptors.LocalReducer | None:
        path = store.pca_path(self.index_dir, encoder)
        if not path.is_file():
            return None
        try:
            return descriptors.LocalReducer.load(path)
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise IndexFormatError(f"{encoder}/{path.name} is unreadable: {exc}") from exc

    def local_reducer(self, encoder: str) -> descriptors.LocalReducer | None:
        """The PCA that reduced ``encoder``'s stored local descriptors (None: none, or no local features)."""
        return self._reducers.get(encoder)

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def masks(self, conditions: list[Condition], views: dict | None = None) -> list[np.ndarray]:
        """One boolean array per shard: the rows that meet every metadata condition (``views``: see
        ``filters.filter_mask``)."""
        return [filter_mask(t, conditions, self._extra_cache[i], views) for i, t in enumerate(self.tables)]

    def forget_views(self) -> None:
        """Drop the cached ``views`` columns (the view functions changed)."""
        for cache in self._extra_cache:
            for key in [k for k in cache if isinstance(k, tuple) and k[:1] == ("view",)]:
                del cache[key]

    @property
    def filter_fields(self) -> frozenset[str]:
        """Every field a filter can name here: metadata columns and the keys of any image's ``extra``
        (also as ``extra.KEY``); read once."""
        with self._lock:
            if self._fields is None:
                self._fields = frozenset().union(*(table_fields(t) for t in self.tables))
            return self._fields

    # -- ids and metadata ---------------------------------------------------------------------------
    def locate(self, image_id: str) -> tuple[int, int]:
        """(shard number, row) of an indexed image; raises ``UnknownIdError``."""
        if not isinstance(image_id, str) or len(image_id) != store.ID_HEX:
            raise UnknownIdError(f"unknown image id {image_id!r}")
        try:
            value = store.id_to_int(image_id)
        except ValueError:
            raise UnknownIdError(f"unknown image id {image_id!r}") from None
        pos = int(np.searchsorted(self._id_sorted, value))
        if pos >= len(self._id_sorted) or self._id_sorted[pos] != value:
            raise UnknownIdError(f"unknown image id {image_id!r}")
        g = int(self._id_order[pos])
        return self._split(g)

    def _split(self, global_row: int) -> tuple[int, int]:
        shard = int(np.searchsorted(self.offsets, global_row, side="right") - 1)
        return shard, int(global_row - self.offsets[shard])

    def hit_for_id(self, image_id: str) -> Hit:
        """A ``Hit`` for an indexed image, scored against nothing (score 0)."""
        shard, row = self.locate(image_id)
        return Hit(image_id, 0.0, shard, row)

    def row_metadata(self, shard: int, row: int) -> dict[str, Any]:
        rec = self.tables[shard].slice(row, 1).to_pylist()[0]
        rec["aliases"] = _json_field(rec.get("aliases"), [])
        rec["extra"] = _json_field(rec.get("extra"), {})
        return rec

    def metadata(self, image_id: str) -> dict[str, Any]:
        """Every metadata column of an indexed image (``aliases`` and ``extra`` parsed)."""
        return self.row_metadata(*self.locate(image_id))

    def describe_hit(self, hit: Hit) -> dict[str, Any]:
        """The JSON shape of a result: ``{id, score, path, caption, metadata}``."""
        rec = self.row_metadata(hit.shard, hit.row)
        meta = {k: rec.get(k) for k in ("source", "width", "height", "size", "mtime", "sha256")}
        if rec.get("aliases"):
            meta["aliases"] = rec["aliases"]
        if isinstance(rec.get("extra"), dict):
            for key, value in rec["extra"].items():
                meta.setdefault(key, value)
        return {"id": hit.id, "score": round(float(hit.score), 6), "path": rec.get("path"),
                "caption": rec.get("caption"), "metadata": meta}

    def source_file(self, image_id: str) -> Path:
        """The local file of an indexed image, if it still holds what was indexed; raises
        ``UnknownIdError`` if it is gone or changed (or the image is only a tar member)."""
        rec = self.metadata(image_id)
        expected = _Expected.of(image_id, rec)
        for cand in _file_candidates(rec):
            if self._verify_file(cand, expected, want_bytes=False) is not None:
                return Path(cand)
        raise self._gone(image_id, rec)

    def source_bytes(self, image_id: str) -> bytes:
        """The indexed image's encoded bytes, exactly as indexed: from its file, or from a webdataset tar
        member (source ``/abs/shard.tar#KEY.jpg``); raises ``UnknownIdError`` if no source still holds them."""
        rec = self.metadata(image_id)
        expected = _Expected.of(image_id, rec)
        for cand in _file_candidates(rec):
            data = self._verify_file(cand, expected, want_bytes=True)
            if data is not None:
                return data
        for cand in _tar_candidates(rec):
            data = self._verify_tar_member(cand, expected)
            if data is not None:
                return data
        raise self._gone(image_id, rec)

    def load_image(self, image_id: str) -> Image.Image:
        """The indexed image as RGB, decoded from the verified bytes of its source file (or tar member)."""
        from retrieval.images import load_image

        return load_image(self.source_bytes(image_id))

    # -- verified reads ----------------------------------------------------------------------------
    def _gone(self, image_id: str, rec: dict[str, Any]) -> UnknownIdError:
        sources = [c for c in (rec.get("path"), rec.get("source"), *(rec.get("aliases") or [])) if c]
        log.warning("image %s: no source still holds the indexed content (tried %s)", image_id,
                    ", ".join(map(str, dict.fromkeys(sources))) or "none recorded")
        return UnknownIdError(f"image {image_id}: the indexed file changed or is gone")

    def _known(self, key: tuple, expected: "_Expected") -> bool:
        with self._lock:
            digest = self._verified.get(key)
            if digest is not None:
                self._verified.move_to_end(key)
        return digest is not None and expected.matches(digest)

    def _remember(self, key: tuple, digest: str) -> None:
        with self._lock:
            self._verified[key] = digest
            self._verified.move_to_end(key)
            while len(self._verified) > VERIFIED_CACHE_SIZE:
                self._verified.popitem(last=False)

    def _verify_file(self, path: str, expected: "_Expected", *, want_bytes: bool) -> bytes | None:
        """The file's bytes (``b""`` when not ``want_bytes``) if it is a regular file holding the indexed
        content; ``None`` otherwise. Everything is read from one open file descriptor."""
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except (OSError, ValueError):
            return None
        with os.fdopen(fd, "rb") as fh:
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or not expected.size_ok(st.st_size):
                    return None
                key = ("file", path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                if self._known(key, expected):
                    return _read_exactly(fh, st.st_size) if want_bytes else b""
                digest, data = _hash_stream(fh, st.st_size, keep=want_bytes)
            except OSError:
                return None
        if digest is None or not expected.matches(digest):
            return None
        self._remember(key, digest)
        return data if want_bytes else b""

    def _verify_tar_member(self, source: str, expected: "_Expected") -> bytes | None:
        data = _read_tar_member(source, expected.max_bytes)
        if data is None or not expected.size_ok(len(data)):
            return None
        return data if expected.matches(store.sha256_bytes(data)) else None

    def local_features(self, encoder: str, hits: Sequence[Hit]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stored local descriptors of ``hits``: ``(desc [p, c] float32, pos [p, 2] (row, col))`` each."""
        entry = self.manifest.encoders[encoder]
        if not entry.local_features:
            raise UnsupportedModalityError(
                f"the index has no local features for {entry.name}; rebuild with `loupe index --local-features`")
        out = []
        for h in hits:
            key = (entry.name, h.shard)
            shard = self._local.get(key)
            if shard is None:
                with self._lock:
                    shard = self._local.get(key) or descriptors.LocalShard(self.index_dir, entry.name,
                                                                     self.shard_names[h.shard], self.manifest)
                    self._local[key] = shard
            out.append(shard.get(h.row))
        return out


def _json_field(raw: Any, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return default


@dataclass(frozen=True)
class _Expected:
    """What an indexed image's bytes must be: ``size`` bytes (when recorded) hashing to ``sha256``
    (when recorded; otherwise to a content id equal to the image id)."""

    image_id: str
    sha256: str | None
    size: int | None

    @classmethod
    def of(cls, image_id: str, rec: dict[str, Any]) -> "_Expected":
        sha = rec.get("sha256")
        sha = sha.lower() if isinstance(sha, str) and len(sha) == 64 else None
        size = rec.get("size")
        size = int(size) if isinstance(size, int) and size >= 0 else None
        return cls(image_id, sha, size)

    @property
    def max_bytes(self) -> int:
        return self.size if self.size is not None else MAX_UNRECORDED_BYTES

    def size_ok(self, size: int) -> bool:
        return size == self.size if self.size is not None else 0 < size <= MAX_UNRECORDED_BYTES

    def matches(self, digest: str) -> bool:
        if self.sha256 is not None:
            return digest == self.sha256
        return store.content_id(digest) == self.image_id


def _file_candidates(rec: dict[str, Any]) -> list[str]:
    """Local paths that may hold an image: its ``path``, ``source`` and ``aliases`` (no URLs, no tar members)."""
    out = []
    for cand in (rec.get("path"), rec.get("source"), *(rec.get("aliases") or [])):
        if isinstance(cand, str) and cand and "://" not in cand and "\0" not in cand and cand not in out:
            out.append(cand)
    return out


def _tar_candidates(rec: dict[str, Any]) -> list[str]:
    return [c for c in dict.fromkeys((rec.get("source"), *(rec.get("aliases") or [])))
            if isinstance(c, str) and "#" in c and "://" not in c]


def _read_exactly(fh, size: int) -> bytes | None:
    data = fh.read(size + 1)
    return data if len(data) == size else None


def _hash_stream(fh, size: int, *, keep: bool) -> tuple[str | None, bytes]:
    """(sha256 of the file's ``size`` bytes, the bytes if ``keep``); ``None`` if the file is not that long."""
    h = hashlib.sha256()
    parts = []
    got = 0
    while got <= size:
        chunk = fh.read(min(_CHUNK, size + 1 - got))
        if not chunk:
            break
        got += len(chunk)
        h.update(chunk)
        if keep:
            parts.append(chunk)
    if got != size:
        return None, b""
    return h.hexdigest(), b"".join(parts)


def _read_tar_member(source: str, max_bytes: int = MAX_UNRECORDED_BYTES) -> bytes | None:
    """The bytes of ``/abs/shard.tar#MEMBER`` (a regular tar file, a regular member of at most
    ``max_bytes``), or ``None``."""
    import tarfile

    tar_path, sep, member = source.partition("#")
    if not sep or not tar_path.lower().endswith(".tar") or "\0" in tar_path:
        return None
    try:
        fd = os.open(tar_path, _OPEN_FLAGS)
    except (OSError, ValueError):
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                return None
            with tarfile.open(fileobj=fh, mode="r:") as tar:
                info = tar.getmember(member)
                if not info.isreg() or info.size > max_bytes:
                    return None
                data = tar.extractfile(info)
                return data.read(max_bytes + 1) if data is not None else None
    except (tarfile.TarError, OSError, KeyError, ValueError):
        return None
