"""The indexer's writer stage: shards through ``retrieval.index.store``, committed so a crash loses nothing.

Commit protocol for one shard ``shard-NNNNN`` (every file is written to a temporary name and renamed):

1. ``<encoder>/shard-NNNNN.faiss`` for every encoder (+ local features, when asked);
2. ``meta/shard-NNNNN.parquet``;
3. metadata of older shards whose ``aliases`` grew (rewritten in place, same rows);
4. ``manifest.json`` listing the new shard — last.

Every file written is recorded in the manifest's ``files`` map with its size and SHA-256, hashed from
the bytes just written (``store.atomic_write_with``'s record). The one file rewritten under its own name,
an older shard's metadata in step 3, is published twice: a manifest that accepts its old and new
versions is written before the rename, and the next manifest keeps only the new one, so a crash at any
point leaves an index whose files match their records.

Readers and the next run trust only shards the manifest lists; files of a shard killed before step 4
are ignored and deleted by the next run (``clean_stray_files``), and its images are indexed again.

Time-based commits (``commit_seconds``: a slow machine loses at most that much work to a crash) do
not leave a trail of small shards: the shard being filled stays *open*. Each commit writes all of its
rows so far under a new shard number, swaps it for the previous version in the manifest (one atomic
write), then deletes the previous version's files; once it holds ``shard_size`` rows it is closed
and the next rows start a new shard. Only a crash leaves a shard smaller than ``shard_size``.
Pruning writes the surviving rows of a shard under a *new* shard number, swaps it in the manifest,
then deletes the old files, so no shard file is ever modified in place with a different row count.

``IndexWriter(..., checkpoint=f)`` calls ``f(point)`` right after each step of the protocol:
``"vectors"`` / ``"local"`` (an encoder's shard file, local features), ``"meta"``, ``"alias"`` (an older
shard's metadata rewritten), ``"manifest"``, and ``"prune"`` (a pruned shard swapped in the manifest,
its old files not yet deleted). Tests pass one that kills the process at the k-th call of a point.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from indexer import index_types
from indexer.local_features import LocalFeatures
from retrieval.errors import IndexFormatError
from retrieval.index import descriptors, store, vector_files

log = logging.getLogger(__name__)

TRAINED_NAME = "trained.faiss"  # per encoder: the trained empty IVF index new shards are cloned from
_SHARD_RE = re.compile(r"^shard-\d{5}\b")


def _no_checkpoint(point: str) -> None:
    """The default checkpoint: nothing to do between commit steps."""


# -- reading the existing index ----------------------------------------------------------------
@dataclass
class IndexState:
    """What a (possibly interrupted) index already holds."""

    ids: dict[str, str] = field(default_factory=dict)                       # id -> shard name
    sources: dict[str, tuple[str, int, float | None]] = field(default_factory=dict)  # source -> (id, size, mtime)


def aliases_of(value: Any) -> list[str]:
    if not value:
        return []
    try:
        out = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        return []
    return [str(s) for s in out] if isinstance(out, list) else []


def load_state(index_dir: Path, manifest: store.Manifest | None) -> IndexState:
    state = IndexState()
    if manifest is None:
        return state
    for shard in manifest.shards:
        table = store.read_metadata(index_dir, shard.name, manifest)
        if table.num_rows != shard.count:
            raise IndexFormatError(f"metadata of {shard.name} has {table.num_rows} rows but the manifest says "
                                   f"{shard.count}; the index is damaged — rebuild it")
        cols = table.select(["id", "source", "size", "mtime", "aliases"]).to_pydict()
        for image_id, source, size, mtime, aliases in zip(cols["id"], cols["source"], cols["size"],
                                                           cols["mtime"], cols["aliases"]):
            state.ids[image_id] = shard.name
            state.sources[source] = (image_id, size, mtime)
            for alias in aliases_of(aliases):
                state.sources.setdefault(alias, (image_id, size, None))
    return state


def next_shard_number(manifest: store.Manifest | None) -> int:
    numbers = [int(s.name.split("-")[1]) for s in (manifest.shards if manifest else [])]
    return max(numbers) + 1 if numbers else 0


def clean_stray_files(index_dir: Path, manifest: store.Manifest | None, encoders: list[str]) -> int:
    """Delete shard files the manifest does not list and temporary files (left by a killed run)."""
    listed = {s.name for s in manifest.shards} if manifest else set()
    removed = 0
    for folder in [index_dir / store.META_DIR] + [index_dir / e for e in encoders]:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            name = path.name
            stray_tmp = name.startswith(".") and ".tmp" in name
            stray_shard = bool(_SHARD_RE.match(name)) and name.split(".")[0] not in listed
            if (stray_tmp or stray_shard) and path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    tmp_manifest = [p for p in index_dir.glob(f".{store.MANIFEST}.*") if p.is_file()]
    for p in tmp_manifest:
        p.unlink(missing_ok=True)
    return removed + len(tmp_manifest)


def shard_files(index_dir: Path, manifest: store.Manifest, shard: str) -> list[Path]:
    files = [store.meta_path(index_dir, shard)]
    for name in manifest.encoders:
        files.append(store.vectors_path(index_dir, name, shard))
        files.extend(store.local_paths(index_dir, name, shard))
    return files


# -- the writer --------------------------------------------------------------------------------
class IndexWriter:
    """Buffers rows + vectors of the current shard and commits shards (see module docstring).

    Not thread-safe: one thread (the background writer) calls it at a time.
    """

    def __init__(self, index_dir: Path, manifest: store.Manifest, state: IndexState, *, shard_size: int,
                 local: dict[str, str] | set[str] | frozenset[str] = frozenset(), use_gpu: bool = False,
                 commit_seconds: float | None = None, checkpoint: Callable[[str], None] | None = None):
        self.dir = Path(index_dir)
        self.manifest = manifest
        self.state = state
        self.shard_size = max(1, int(shard_size))
        self.use_gpu = use_gpu
        self.next_no = next_shard_number(manifest)
        self.rows: list[dict[str, Any]] = []
        self.vectors: dict[str, list[np.ndarray]] = {e: [] for e in manifest.encoders}
        self.pending_local: dict[str, list] = {e: [] for e in manifest.encoders}
        self.alias_updates: dict[str, dict[str, list[str]]] = {}   # shard -> id -> new alias sources
        self.pending_pos: dict[str, int] = {}                       # id -> row in self.rows
        self.local: dict[str, LocalFeatures] = {}
        asked = local if isinstance(local, dict) else dict.fromkeys(local, "final")
        for name, entry in manifest.encoders.items():
            if entry.local_features is not None or name in asked:
                self.local[name] = self._local_for(name, entry, asked.get(name, "final"))
        self.local_layers = {name: feats.layer for name, feats in self.local.items()}   # for the embedding step
        self.committed = 0
        self.open_shard: str | None = None      # the committed version of the shard being filled
        self.open_count = 0                     # rows of self.rows already in open_shard
        self.open_index: dict[str, Any] = {}    # encoder -> the open shard's FAISS index (grows in place)
        self.dirty = False                      # self.rows changed since the last commit
        self.commit_seconds = commit_seconds
        self.last_commit = time.monotonic()
        self.checkpoint = checkpoint or _no_checkpoint     # called after each commit step (module docstring)

    def _local_for(self, name: str, entry: store.EncoderEntry, layer: str = "final") -> LocalFeatures:
        if entry.local_features is None:
            return LocalFeatures(layer=layer)
        pca = store.pca_path(self.dir, name)
        if not pca.is_file():
            raise IndexFormatError(f"{pca} is missing but the manifest lists local features for {name}; "
                                   "rebuild the index")
        grid = entry.local_features.get("grid") or [0, 0]
        return LocalFeatures(descriptors.LocalReducer.load(pca), (int(grid[0]), int(grid[1])),
                             entry.local_features.get("layer", "final"))

    # -- adding ----------------------------------------------------------------------------------
    def add(self, rows: list[dict[str, Any]], vectors: dict[str, np.ndarray],
            local: dict[str, tuple[np.ndarray, tuple[int, int]]] | None = None) -> None:
        start = 0
        while start < len(rows):
            take = min(self.shard_size - len(self.rows), len(rows) - start)
            sl = slice(start, start + take)
            for row in rows[sl]:
                row.setdefault("aliases", [])
                self.pending_pos[row["id"]] = len(self.rows)
                self.rows.append(row)
            self.dirty = self.dirty or take > 0
            for name in self.manifest.encoders:
                self.vectors[name].append(vectors[name][sl])
            for name, feats in self.local.items():
                tokens, grid = (local or {})[name]
                reduced = feats.add(tokens[sl], grid)
                if reduced is not None:
                    self.pending_local[name].extend(reduced)
                elif feats.ready_to_fit():
                    self.pending_local[name].extend(self._fit(name, feats))
            start += take
            if len(self.rows) >= self.shard_size or self._commit_due():
                self.commit()

    def _fit(self, name: str, feats: LocalFeatures) -> list[tuple[np.ndarray, np.ndarray]]:
        path = store.pca_path(self.dir, name)
        reduced = feats.fit(path)
        self.manifest.record(self.dir, path, feats.pca_record)
        return reduced

    def _commit_due(self) -> bool:
        """Time-based commit (slow machines lose at most ``commit_seconds`` of work to a crash); not
        before an IVF-PQ index has been trained on a full first shard."""
        if self.commit_seconds is None or not self.dirty:
            return False
        untrained = not self.manifest.shards and any(e.index_type == "ivfpq" for e in self.manifest.encoders.values())
        return not untrained and time.monotonic() - self.last_commit >= self.commit_seconds

    def add_alias(self, image_id: str, source: str) -> None:
        """``source`` has the same content as ``image_id``: record it, do not embed it again."""
        if image_id in self.pending_pos:
            self.rows[self.pending_pos[image_id]]["aliases"].append(source)
            self.dirty = True
            return
        shard = self.state.ids.get(image_id)
        if shard is None:
            raise ValueError(f"alias for unknown id {image_id}")
        self.alias_updates.setdefault(shard, {}).setdefault(image_id, []).append(source)

    def finish(self) -> None:
        if self.dirty:
            self.commit()
        elif self.alias_updates:
            self._commit_aliases()
            store.write_manifest(self.dir, self.manifest)
        else:
            store.write_manifest(self.dir, self.manifest)

    # -- committing ------------------------------------------------------------------------------
    def _build_index(self, name: str, vectors: np.ndarray):
        import faiss

        entry = self.manifest.encoders[name]
        if entry.index_type != "ivfpq":
            return index_types.new_index(entry.factory, entry.dim)
        trained = self.dir / name / TRAINED_NAME
        if trained.is_file() and self.manifest.shards:
            if store.check_digest(self.dir, self.manifest, trained, store.file_record(trained)) is False:
                raise IndexFormatError(f"{trained} does not match its checksum: it was changed or damaged after "
                                       f"indexing — {store.REPAIR_HINT}")
            try:
                index = faiss.read_index(str(trained))
            except RuntimeError as exc:
                raise IndexFormatError(f"{trained} is unreadable ({exc}); {store.REPAIR_HINT}") from exc
            if index.is_trained and index.d == entry.dim:
                return index
        factory = index_types.fit_factory(entry.factory, len(vectors))
        if len(vectors) < 2:
            log.warning("%s: too few vectors (%d) to train IVF-PQ; using a flat index", name, len(vectors))
            entry.index_type, entry.factory = "flat", "Flat"
            return index_types.new_index("Flat", entry.dim)
        index = index_types.new_index(factory, entry.dim)
        index_types.train(index, vectors, use_gpu=self.use_gpu)
        record = store.atomic_write_with(trained, lambda tmp: faiss.write_index(index, tmp))
        self.manifest.record(self.dir, trained, record)
        entry.factory = factory
        return index

    def commit(self) -> None:
        """Write the open shard's rows as a new shard, then the manifest (which drops the shard's
        previous version, if any); the shard stays open for more rows until it is full."""
        shard = store.shard_name(self.next_no)
        n = len(self.rows)
        for name, feats in self.local.items():
            if feats.reducer is None:
                self.pending_local[name].extend(self._fit(name, feats))
        for name in self.manifest.encoders:
            # only vectors added since the last commit: the open shard's index keeps the earlier ones
            # (rebuilding an HNSW graph of the whole shard at every time-based commit would be slow)
            new = np.concatenate(self.vectors[name]) if self.vectors[name] else None
            index = self.open_index.get(name)
            if index is None:
                index = self._build_index(name, new)
            if new is not None:
                index_types.add_vectors(index, new)
            self.vectors[name] = []
            self.open_index[name] = index
            self.manifest.record_all(self.dir, vector_files.write_vectors(self.dir, name, shard, index))
            self.checkpoint("vectors")
            if name in self.local:
                self.manifest.record_all(self.dir,
                                         descriptors.write_local(self.dir, name, shard, self.pending_local[name]))
                self.manifest.encoders[name].local_features = self.local[name].describe()
                self.checkpoint("local")
        self.manifest.record_all(self.dir, store.write_metadata(self.dir, shard, self.rows))
        self.checkpoint("meta")
        self._commit_aliases()
        previous = self.open_shard
        if previous is not None:
            self.manifest.shards = [s for s in self.manifest.shards if s.name != previous]
        self.manifest.shards.append(store.ShardEntry(shard, n))
        store.write_manifest(self.dir, self.manifest)
        self.checkpoint("manifest")
        if previous is not None:                # its rows live on in the new version
            for path in shard_files(self.dir, self.manifest, previous):
                path.unlink(missing_ok=True)
        for row in self.rows:
            self.state.ids[row["id"]] = shard
        self.committed += n - self.open_count
        self.next_no += 1
        self.last_commit = time.monotonic()
        self.dirty = False
        if n >= self.shard_size:                # full: close it
            self.open_shard, self.open_count, self.open_index = None, 0, {}
            self.rows, self.pending_pos = [], {}
            self.pending_local = {e: [] for e in self.manifest.encoders}
        else:                                   # time-based commit: keep filling it
            self.open_shard, self.open_count = shard, n

    def _commit_aliases(self) -> None:
        for shard, updates in self.alias_updates.items():
            rows = store.read_metadata(self.dir, shard).to_pylist()
            for row in rows:
                extra = updates.get(row["id"])
                if extra:
                    known = aliases_of(row["aliases"])
                    row["aliases"] = known + [s for s in extra if s not in known and s != row["source"]]
            self._rewrite_metadata(shard, rows)
            self.checkpoint("alias")
        self.alias_updates = {}

    def _rewrite_metadata(self, shard: str, rows: list[dict[str, Any]]) -> None:
        """Rewrite a listed shard's metadata under its own name (same rows, new aliases): just before the
        rename, publish a manifest that accepts the old and the new file (module docstring)."""
        path = store.meta_path(self.dir, shard)
        rel = store.relative(self.dir, path)
        old = self.manifest.files.get(rel)

        def publish(record: dict[str, Any]) -> None:
            if old is not None:
                self.manifest.files[rel] = {"size": record["size"], "sha256": record["sha256"],
                                            "previous": [{"size": old["size"], "sha256": old["sha256"]}]}
                store.write_manifest(self.dir, self.manifest)

        self.manifest.record_all(self.dir, store.write_metadata(self.dir, shard, rows, before_replace=publish))

    # -- pruning ---------------------------------------------------------------------------------
    def drop_sources(self, gone: set[str]) -> int:
        """Remove ``gone`` sources; an image survives while one of its sources (or aliases) remains.

        Returns the number of images removed. Must run before any ``add``.
        """
        removed = 0
        for entry in list(self.manifest.shards):
            rows = store.read_metadata(self.dir, entry.name).to_pylist()
            if not any(r["source"] in gone or any(a in gone for a in aliases_of(r["aliases"])) for r in rows):
                continue
            keep, kept_rows = [], []
            for i, row in enumerate(rows):
                remaining = [s for s in [row["source"], *aliases_of(row["aliases"])] if s not in gone]
                if not remaining:
                    continue
                if remaining[0] != row["source"]:
                    row["source"] = remaining[0]
                    is_file = os.path.isfile(remaining[0])
                    row["path"] = remaining[0] if is_file else None
                    row["mtime"] = os.stat(remaining[0]).st_mtime if is_file else None
                row["aliases"] = remaining[1:]
                keep.append(i)
                kept_rows.append(row)
            keep_set = set(keep)
            dropped = [r for i, r in enumerate(rows) if i not in keep_set]
            for row in dropped:
                self.state.ids.pop(row["id"], None)
            for s in gone:
                self.state.sources.pop(s, None)
            if len(keep) == len(rows):  # only aliases changed: same rows, rewrite the metadata
                self._rewrite_metadata(entry.name, kept_rows)
                continue
            removed += len(rows) - len(keep)
            old_files = shard_files(self.dir, self.manifest, entry.name)
            position = self.manifest.shards.index(entry)
            if keep:
                new = store.shard_name(self.next_no)
                self.next_no += 1
                self._write_subset(entry.name, new, keep, kept_rows)
                self.manifest.shards[position] = store.ShardEntry(new, len(keep))
                for row in kept_rows:
                    self.state.ids[row["id"]] = new
            else:
                del self.manifest.shards[position]
            store.write_manifest(self.dir, self.manifest)
            self.checkpoint("prune")
            for path in old_files:
                path.unlink(missing_ok=True)
        return removed

    def _write_subset(self, old: str, new: str, keep: list[int], rows: list[dict[str, Any]]) -> None:
        import faiss

        for name, entry in self.manifest.encoders.items():
            binary = entry.index_type == "binary"
            index = vector_files.read_vectors(self.dir, name, old, mmap=False, binary=binary, manifest=self.manifest)
            codes = index_types.all_codes(index)[keep]
            if entry.index_type == "ivfpq":
                fresh = faiss.clone_index(index)
                fresh.reset()
            else:
                fresh = index_types.new_index(entry.factory, entry.dim)
            index_types.add_vectors(fresh, codes)
            self.manifest.record_all(self.dir, vector_files.write_vectors(self.dir, name, new, fresh))
            if entry.local_features is not None:
                shard = descriptors.LocalShard(self.dir, name, old, self.manifest)
                per_image = [shard.get(i) for i in keep]
                self.manifest.record_all(self.dir, descriptors.write_local(self.dir, name, new, per_image))
        self.manifest.record_all(self.dir, store.write_metadata(self.dir, new, rows))


# -- the background thread ---------------------------------------------------------------------
class BackgroundWriter:
    """Runs an ``IndexWriter`` in a thread fed by a bounded queue, so writing overlaps encoding."""

    def __init__(self, writer: IndexWriter, maxsize: int = 4):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="loupe-index-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            op = self.queue.get()
            if op is None:
                return
            if self.error is not None:
                continue
            try:
                method, args = op
                getattr(self.writer, method)(*args)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def add(self, rows, vectors, local=None) -> None:
        self._check()
        self.queue.put(("add", (rows, vectors, local)))

    def add_alias(self, image_id: str, source: str) -> None:
        self._check()
        self.queue.put(("add_alias", (image_id, source)))

    def close(self, *, finish: bool = True) -> None:
        if finish:
            self.queue.put(("finish", ()))
        self.queue.put(None)
        self.thread.join()
        self._check()
