"""``verify_index(DIR)``: check every file of an index against its manifest — ``loupe verify``.

Opening an index checks what is cheap (sizes, metadata checksums, dimensions, counts, ids, flat vectors'
norms: ``retrieval.index.store``); ``verify_index`` checks everything, reading every file once more:

* every file the manifest lists exists and has its recorded size and SHA-256 (files written by an older
  Loupe have no record: they are counted in ``unrecorded`` and only checked for what they hold);
* metadata: readable, one row per image, ids of 15 lowercase hex characters, no id twice in the index;
* vectors: readable FAISS indexes of the encoder's dimension, one vector per image, unit vectors (flat
  and HNSW-flat float shards);
* local features: shapes, offsets (from 0, never decreasing, ending at the number of descriptors), unit
  descriptors, positions on the encoder's grid; the PCA's shape.

It returns a :class:`VerifyReport` (one :class:`Problem` per damaged file) and never raises for damage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.errors import IndexFormatError
from retrieval.index import descriptors, store, vector_files

__all__ = ["Problem", "VerifyReport", "verify_index"]

CHUNK_ROWS = 1 << 16      # local descriptors checked per step


@dataclass
class Problem:
    file: str          # relative to the index folder ("manifest.json", "meta/shard-00000.parquet", ...)
    message: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "message": self.message}


@dataclass
class VerifyReport:
    index_dir: Path
    problems: list[Problem] = field(default_factory=list)
    files: int = 0             # files checked
    bytes: int = 0             # bytes hashed
    images: int = 0
    unrecorded: list[str] = field(default_factory=list)    # files without a recorded checksum (older index)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, file: str, message: str) -> None:
        """One problem per file: a second one is appended to the first's message."""
        message = _short(message).replace(f"{self.index_dir}/", "")     # the line names the file already
        for p in self.problems:
            if p.file == file:
                if message not in p.message:
                    p.message += f"; {message}"
                return
        self.problems.append(Problem(file, message))

    def summary(self) -> str:
        what = (f"{self.images} images, {self.files} files, {self.bytes / 2**20:.1f} MB checked in "
                f"{self.seconds:.2f} s")
        note = (f"; {len(self.unrecorded)} files have no recorded checksum (written by an older Loupe)"
                if self.unrecorded else "")
        if self.ok:
            return f"{self.index_dir}: OK — {what}{note}"
        return (f"{self.index_dir}: {len(self.problems)} damaged file(s) — {what}{note}; "
                f"{store.REPAIR_HINT}")

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "index": str(self.index_dir), "images": self.images, "files": self.files,
                "bytes": self.bytes, "seconds": round(self.seconds, 3), "unrecorded": self.unrecorded,
                "problems": [p.to_json() for p in self.problems]}


def _short(message: str) -> str:
    """A library message without its repair hint (the summary gives it once)."""
    for tail in (f" — {store.REPAIR_HINT}", f"; {store.REPAIR_HINT}"):
        message = message.replace(tail, "")
    return message


def verify_index(index_dir, *, checksums: bool = True) -> VerifyReport:
    """Check every file of the index at ``index_dir``; ``checksums=False`` skips the SHA-256s (sizes only)."""
    t0 = time.perf_counter()
    index_dir = Path(index_dir).expanduser()
    report = VerifyReport(index_dir)
    try:
        manifest = store.read_manifest(index_dir)
    except IndexFormatError as exc:
        report.add(store.MANIFEST, str(exc))
        report.seconds = time.perf_counter() - t0
        return report
    report.images = manifest.count
    _check_files(index_dir, manifest, report, checksums)
    _check_contents(index_dir, manifest, report)
    report.seconds = time.perf_counter() - t0
    return report


def _check_files(index_dir: Path, manifest: store.Manifest, report: VerifyReport, checksums: bool) -> None:
    wanted = dict(store.index_files(manifest))
    for rel in manifest.listed_files():
        wanted.setdefault(rel, True)
    for rel, required in wanted.items():
        path = index_dir / rel
        if not path.is_file():
            if required:
                report.add(rel, "missing")
            continue
        report.files += 1
        rec = manifest.files.get(rel)
        if rec is None:
            report.unrecorded.append(rel)
            continue
        try:
            now = store.file_record(path) if checksums else {"size": path.stat().st_size, "sha256": None}
        except OSError as exc:
            report.add(rel, f"cannot be read: {exc.strerror or exc}")
            continue
        report.bytes += now["size"] if checksums else 0
        sizes = [rec["size"]] + [p["size"] for p in rec.get("previous", [])]
        if now["size"] not in sizes:
            report.add(rel, f"{now['size']} bytes, written with {rec['size']}: truncated or changed after indexing")
        elif checksums and not store.check_digest(index_dir, manifest, path, now):
            report.add(rel, "does not match its SHA-256: changed or damaged after indexing")


def _check_contents(index_dir: Path, manifest: store.Manifest, report: VerifyReport) -> None:
    seen: dict[str, str] = {}
    for shard in manifest.shards:
        rel = f"{store.META_DIR}/{shard.name}.parquet"
        try:
            table = store.read_metadata(index_dir, shard.name)
            store.check_ids(table, index_dir / rel, unique=True)
            if table.num_rows != shard.count:
                report.add(rel, f"{table.num_rows} rows, the manifest says {shard.count}")
            for image_id in table.column("id").to_pylist():
                if image_id in seen:
                    report.add(rel, f"id {image_id} is also in {seen[image_id]}")
                    break
                seen[image_id] = rel
        except IndexFormatError as exc:
            report.add(rel, str(exc))
        for name, entry in manifest.encoders.items():
            rel = f"{name}/{shard.name}.faiss"
            try:
                index = vector_files.read_vectors(index_dir, name, shard.name, mmap=False,
                                           binary=entry.index_type == "binary")
                vector_files.check_vectors(index, entry, shard.count, index_dir / rel)
                del index
            except IndexFormatError as exc:
                report.add(rel, str(exc))
            if entry.local_features is not None:
                _check_local(index_dir, entry, shard, report)
    _check_layouts(index_dir, manifest, report)
    for name, entry in manifest.encoders.items():
        if entry.local_features is None or not manifest.shards:
            continue
        path = store.pca_path(index_dir, name)
        rel = store.relative(index_dir, path)
        if not path.is_file():
            continue            # reported missing above
        try:
            reducer = descriptors.LocalReducer.load(path)
            dim = entry.local_features.get("dim")
            if dim and reducer.dim != dim:
                report.add(rel, f"reduces to {reducer.dim} dimensions, the manifest says {dim}")
        except IndexFormatError as exc:
            report.add(rel, str(exc))


def _check_layouts(index_dir: Path, manifest: store.Manifest, report: VerifyReport) -> None:
    """Each encoder's searchable layout (``loupe optimize``): readable, the encoder's dimension, one vector
    per image it covers, unit norms where the vectors are exact."""
    from retrieval.index.layout import layout_files, layout_path, layouts_of, read_layout
    from retrieval.index.ondisk import check_ids

    try:
        layouts = layouts_of(manifest)
    except IndexFormatError as exc:
        report.add(store.MANIFEST, str(exc))
        return
    for name, layout in layouts.items():
        path = layout_path(index_dir, name, layout)
        rel = store.relative(index_dir, path)
        if not all(p.is_file() for p in layout_files(index_dir, name, layout)):
            continue            # reported missing above
        try:
            index = read_layout(index_dir, name, layout, mmap=False)
            vector_files.check_vectors(index, manifest.encoders[name], layout.count, path,
                                norms=layout.index_type in ("flat", "hnsw"))
            if layout.index_type.startswith("ivf"):      # IVF (merged on disk, or fast-scan in RAM): the
                check_ids(index, layout.count, path)       # lists hold every row once
            del index
        except RuntimeError as exc:
            report.add(rel, f"unreadable: {exc}")
        except IndexFormatError as exc:
            report.add(rel, str(exc))


def _check_local(index_dir: Path, entry: store.EncoderEntry, shard: store.ShardEntry, report: VerifyReport) -> None:
    desc_p, pos_p, off_p = store.local_paths(index_dir, entry.name, shard.name)
    rel = store.relative(index_dir, desc_p)
    if not (desc_p.is_file() and pos_p.is_file() and off_p.is_file()):
        return                  # reported missing above
    try:
        desc = np.load(desc_p, mmap_mode="r")
        pos = np.load(pos_p, mmap_mode="r")
        off = np.load(off_p)
    except (OSError, ValueError, EOFError) as exc:
        report.add(rel, f"local features of {entry.name}/{shard.name} are unreadable: {exc}")
        return
    try:
        descriptors.check_local(desc, pos, off, f"{entry.name}/{shard.name}", count=shard.count,
                          dim=(entry.local_features or {}).get("dim"))
    except IndexFormatError as exc:
        report.add(rel, str(exc))
        return
    for start in range(0, len(desc), CHUNK_ROWS):
        bad = descriptors.bad_local_rows(np.asarray(desc[start:start + CHUNK_ROWS], dtype=np.float32))
        if bad.any():
            token = start + int(np.argmax(bad))
            image = int(np.searchsorted(off, token, side="right") - 1)
            report.add(rel, f"descriptor {token} (image {image}) is not a unit vector: damaged after indexing")
            break
    grid = (entry.local_features or {}).get("grid")
    if grid and len(pos):
        p = np.asarray(pos)
        if (p < 0).any() or (p[:, 0] >= int(grid[0])).any() or (p[:, 1] >= int(grid[1])).any():
            report.add(store.relative(index_dir, pos_p), f"positions outside the {grid[0]}x{grid[1]} grid")
    del desc, pos
