"""``RecordStore``: what an opened index holds about its images — ids, metadata, source files, local
features.

* An image id maps to ``(shard number, row)`` through a sorted array of the ids' integer values.
* Metadata rows come from the Parquet shards (``aliases`` and ``extra`` are JSON columns); an image's
  bytes from its source file, or from a webdataset tar member (``/abs/shard.tar#KEY.jpg``).
* Local descriptors (re-ranking) come from ``store.LocalShard``, opened once per shard.
* ``masks(conditions)``: a metadata filter as one boolean array per shard (``retrieval.index.filters``).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from retrieval.errors import IndexFormatError, UnknownIdError, UnsupportedModalityError
from retrieval.index import store
from retrieval.index.filters import Condition, filter_mask
from retrieval.types import Hit


class RecordStore:
    """The metadata shards of an index, read once when the index is opened."""

    def __init__(self, index_dir: Path, manifest: store.Manifest):
        self.index_dir = index_dir
        self.manifest = manifest
        self.shard_names = [s.name for s in manifest.shards]
        self.tables = []
        for entry in manifest.shards:
            table = store.read_metadata(index_dir, entry.name)
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
        self._local: dict[tuple[str, int], store.LocalShard] = {}
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def masks(self, conditions: list[Condition]) -> list[np.ndarray]:
        """One boolean array per shard: the rows that meet every metadata condition."""
        return [filter_mask(t, conditions, self._extra_cache[i]) for i, t in enumerate(self.tables)]

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
        """The readable local file of an indexed image; raises ``UnknownIdError`` if gone."""
        rec = self.metadata(image_id)
        for cand in (rec.get("path"), rec.get("source"), *(rec.get("aliases") or [])):
            if isinstance(cand, str) and cand and "://" not in cand and os.path.isfile(cand):
                return Path(cand)
        raise UnknownIdError(f"image {image_id} is indexed but its source file is gone ({rec.get('source')})")

    def source_bytes(self, image_id: str) -> bytes:
        """The indexed image's encoded bytes: from its file, or from a webdataset tar member
        (source ``/abs/shard.tar#KEY.jpg``)."""
        try:
            return self.source_file(image_id).read_bytes()
        except UnknownIdError:
            rec = self.metadata(image_id)
            for cand in (rec.get("source"), *(rec.get("aliases") or [])):
                data = _read_tar_member(cand) if isinstance(cand, str) else None
                if data is not None:
                    return data
            raise

    def load_image(self, image_id: str) -> Image.Image:
        """The indexed image as RGB, decoded from its source file (or tar member)."""
        from retrieval.images import load_image

        try:
            return load_image(self.source_file(image_id))
        except UnknownIdError:
            return load_image(self.source_bytes(image_id))

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
                    shard = self._local.get(key) or store.LocalShard(self.index_dir, entry.name,
                                                                     self.shard_names[h.shard])
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


def _read_tar_member(source: str) -> bytes | None:
    import tarfile

    tar_path, sep, member = source.partition("#")
    if not sep or not tar_path.lower().endswith(".tar") or not os.path.isfile(tar_path):
        return None
    try:
        with tarfile.open(tar_path, "r:") as tar:
            fh = tar.extractfile(member)
            return fh.read() if fh is not None else None
    except (tarfile.TarError, OSError, KeyError):
        return None
