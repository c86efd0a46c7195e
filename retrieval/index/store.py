"""The on-disk index format: manifest, FAISS shards, Parquet metadata, local features.

Layout of an index directory ``DIR``::

    DIR/manifest.json                      format version, encoders, shards, counts, times (written last)
    DIR/.lock                              held by a writing `loupe index` / `loupe optimize` (filelock)
    DIR/meta/shard-NNNNN.parquet           one metadata row per image of the shard
    DIR/<encoder>/shard-NNNNN.faiss        the shard's vectors; vector i <-> metadata row i
    DIR/<encoder>/shard-NNNNN.local.npy    (optional) float16 [total_tokens, c] reduced local descriptors
    DIR/<encoder>/shard-NNNNN.local-pos.npy   int16 [total_tokens, 2] (row, col) on the encoder's grid
    DIR/<encoder>/shard-NNNNN.local-off.npy   int64 [n + 1]: image i owns tokens off[i]:off[i+1]
    DIR/<encoder>/local-pca.npz            (optional) mean [C], components [c, C] of the reduction
    DIR/<encoder>/search-NNNNN.faiss[.ivfdata]   (optional) `loupe optimize`'s layout (retrieval.index.optimize)
    DIR/regions/<encoder>.npy|.parquet     (optional) `loupe index --regions` (retrieval.regions.store)

Every shard holds the same images, in the same order, for every encoder of the index. Metadata
columns: ``id`` (15 hex chars = first 60 bits of the SHA-256 of the file's bytes: re-indexing the
same content gives the same id), ``source`` (path or URL), ``path`` (absolute path, if a file),
``caption``, ``width``, ``height``, ``sha256``, ``size`` (bytes), ``mtime``, ``aliases`` (other
sources with identical content, JSON list) and ``extra`` (JSON object of manifest columns).

Vectors are L2-normalised float32; the metric is inner product (= cosine). Every file is written to
a temporary name then renamed into place (``os.replace``), and the manifest is replaced last, so a
crash at any moment leaves the previous state readable: readers only trust shards the manifest lists.

Integrity. The manifest's optional ``files`` map (older manifests have none) records the size and SHA-256
of every file readers open, taken from the bytes just written (``atomic_write_with`` returns them):
``{"meta/shard-00000.parquet": {"size": 1234, "sha256": "…"}, …}``. A file rewritten under the same name
(a metadata shard whose ``aliases`` grew) is published with its ``previous`` record(s) still accepted, so a
crash before the manifest leaves an index that checks clean. Readers check sizes on open, metadata
checksums and the contents' shape; ``loupe verify`` (``retrieval.index.verify``) checks every checksum. A
mismatch is an ``IndexFormatError`` that names the file and what to do.

Here: layout, ids, atomic writes, manifest, metadata. FAISS shards: :mod:`retrieval.index.vector_files`;
local descriptors: :mod:`retrieval.index.descriptors`; ``loupe optimize``'s layout: ``optimize``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from retrieval.errors import IndexFormatError, UnknownEncoderError

log = logging.getLogger("loupe.index")

FORMAT_NAME = "loupe-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DIR = "meta"
ID_HEX = 15  # 60 bits: fits a positive int64 exactly

SHARD_NAME = re.compile(r"shard-[0-9]{5,9}")                         # what ``shard_name`` writes (fullmatch)
ENCODER_DIR = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,127}")    # an encoder's folder name (fullmatch)

ID_PATTERN = re.compile(r"[0-9a-f]{15}")                             # an image id (fullmatch)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
REPAIR_HINT = "restore it from a backup, or rebuild the index: rerun `loupe index` into a new folder"

METADATA_COLUMNS = ("id", "source", "path", "caption", "width", "height", "sha256", "size", "mtime",
                    "aliases", "extra")


# -- ids ---------------------------------------------------------------------------------------
def content_id(sha256_hex: str) -> str:
    """Stable image id from the content hash."""
    return sha256_hex[:ID_HEX]


def id_to_int(image_id: str) -> int:
    return int(image_id, 16)


def int_to_id(value: int) -> str:
    return f"{int(value):0{ID_HEX}x}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# -- atomic writes -----------------------------------------------------------------------------
def _umask_mode() -> int:
    """0o666 minus the process umask: what ``open()`` would give a new file (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> dict[str, Any]:
    return atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_with(path: str | os.PathLike, writer, *, before_replace=None) -> dict[str, Any]:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path``; returns the file's record
    ``{"size", "sha256"}`` (hashed from the bytes just written, read back from the page cache while they
    are synced). ``before_replace(record)`` runs after the file is complete and before the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            record = _hash_file(fh)
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        if before_replace is not None:
            before_replace(record)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


def _hash_file(fh, chunk: int = 1 << 20) -> dict[str, Any]:
    h, size = hashlib.sha256(), 0
    while True:
        data = fh.read(chunk)
        if not data:
            return {"size": size, "sha256": h.hexdigest()}
        h.update(data)
        size += len(data)


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size", "sha256"}`` of a file as it is now."""
    with open(path, "rb") as fh:
        return _hash_file(fh)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> dict[str, Any]:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


# -- manifest ----------------------------------------------------------------------------------
@dataclass
class EncoderEntry:
    name: str
    dim: int
    metric: str = "ip"
    normalized: bool = True
    index_type: str = "flat"           # flat | ivfpq | hnsw | binary
    factory: str = "Flat"              # faiss index_factory string
    modalities: list[str] = field(default_factory=lambda: ["image"])
    local_features: dict[str, Any] | None = None   # {"dim", "grid": [h, w], "per_image", "dtype"}

    @property
    def supports_text(self) -> bool:
        return "text" in self.modalities


@dataclass
class ShardEntry:
    name: str          # "shard-00000"
    count: int


@dataclass
class Manifest:
    encoders: dict[str, EncoderEntry]
    shards: list[ShardEntry] = field(default_factory=list)
    created: str = field(default_factory=now_iso)
    updated: str = field(default_factory=now_iso)
    extra: dict[str, Any] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)   # relative path -> {"size", "sha256"[, "previous"]}

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def text_encoder(self) -> str | None:
        """The first encoder that embeds text (answers text queries)."""
        return next((e.name for e in self.encoders.values() if e.supports_text), None)

    @property
    def default_encoder(self) -> str:
        return self.text_encoder or next(iter(self.encoders))

    def entry(self, name: str | None = None) -> EncoderEntry:
        """The entry of encoder ``name`` (``None``: the default one); raises ``UnknownEncoderError``."""
        name = name or self.default_encoder
        if not isinstance(name, str) or name not in self.encoders:
            raise UnknownEncoderError(f"encoder {name!r} is not in this index; it has: {', '.join(self.encoders)}")
        return self.encoders[name]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION,
            "created": self.created, "updated": self.updated,
            "count": self.count,
            "encoders": {n: e.__dict__ for n, e in self.encoders.items()},
            "shards": [s.__dict__ for s in self.shards],
            **({"extra": self.extra} if self.extra else {}),
            **({"files": files} if (files := self.listed_files()) else {}),
        }

    def listed_files(self) -> dict[str, dict[str, Any]]:
        """The ``files`` records, sorted, without those of shards the manifest no longer lists."""
        listed = {s.name for s in self.shards}
        out = {}
        for rel in sorted(self.files):
            m = _SHARD_FILE.fullmatch(rel)
            if m is None or m.group(1) in listed:
                out[rel] = self.files[rel]
        return out

    def record(self, index_dir, path, record: dict[str, Any]) -> None:
        """Record ``path`` (a file under ``index_dir``) as written with ``record``."""
        self.files[relative(index_dir, path)] = {"size": int(record["size"]), "sha256": record["sha256"]}

    def record_all(self, index_dir, records: dict[str, dict[str, Any]]) -> None:
        for path, record in records.items():
            self.record(index_dir, path, record)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> "Manifest":
        if obj.get("format") != FORMAT_NAME:
            raise IndexFormatError("not a Loupe index (manifest.json has no 'format': 'loupe-index')")
        if int(obj.get("version", 0)) > FORMAT_VERSION:
            raise IndexFormatError(f"index format version {obj.get('version')} is newer than this Loupe "
                                   f"({FORMAT_VERSION}); upgrade loupe-search")
        manifest = cls(
            encoders={n: EncoderEntry(**e) for n, e in obj["encoders"].items()},
            shards=[ShardEntry(**s) for s in obj.get("shards", [])],
            created=obj.get("created", now_iso()), updated=obj.get("updated", now_iso()),
            extra=obj.get("extra", {}),
            files=_check_files(obj.get("files", {})),
        )
        check_names(manifest)
        return manifest


_SHARD_FILE = re.compile(r"(?:[^/]+/)?(shard-[0-9]{5,9})\.[^/]+")   # a shard's file, relative to the index


def _check_record(rel: str, rec: Any) -> dict[str, Any]:
    ok = (isinstance(rec, dict) and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool)
          and rec["size"] >= 0 and isinstance(rec.get("sha256"), str) and SHA256_HEX.fullmatch(rec["sha256"]))
    if not ok:
        raise IndexFormatError(f"manifest.json records file {rel!r} as {rec!r} (not {{'size', 'sha256'}}); "
                               "the manifest is damaged")
    out = {"size": rec["size"], "sha256": rec["sha256"]}
    if rec.get("previous"):
        if not isinstance(rec["previous"], list):
            raise IndexFormatError(f"manifest.json records file {rel!r} with a bad 'previous'; the manifest is damaged")
        out["previous"] = [_check_record(rel, p) for p in rec["previous"]]
    return out


def _check_files(files: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise IndexFormatError("manifest.json's 'files' is not an object; the manifest is damaged")
    out = {}
    for rel, rec in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
            raise IndexFormatError(f"manifest.json records a file {rel!r} outside the index; the manifest is damaged")
        out[rel] = _check_record(rel, rec)
    return out


def relative(index_dir, path) -> str:
    """``path`` relative to ``index_dir``, with ``/`` separators (a key of ``Manifest.files``)."""
    return Path(path).relative_to(Path(index_dir)).as_posix()


def check_names(manifest: Manifest) -> None:
    """Shard and encoder names become file and folder names under the index directory: accept only the
    names Loupe writes (``shard-NNNNN``; an encoder name without path separators or ``..``), so a
    crafted manifest cannot point a reader outside the index. Raises ``IndexFormatError``."""
    for key, entry in manifest.encoders.items():
        for name in {key, entry.name}:
            if not isinstance(name, str) or not ENCODER_DIR.fullmatch(name) or ".." in name:
                raise IndexFormatError(f"manifest.json names an encoder {name!r}: an encoder name is a folder of "
                                       "the index (no '/', '\\', '..' or leading '.'); "
                                       "the manifest is damaged or was not written by Loupe")
    seen = set()
    for shard in manifest.shards:
        if not isinstance(shard.name, str) or not SHARD_NAME.fullmatch(shard.name):
            raise IndexFormatError(f"manifest.json lists a shard {shard.name!r}: shard names are 'shard-NNNNN'; "
                                   "the manifest is damaged or was not written by Loupe")
        if shard.name in seen:
            raise IndexFormatError(f"manifest.json lists shard {shard.name!r} twice; the manifest is damaged")
        seen.add(shard.name)
        if isinstance(shard.count, bool) or not isinstance(shard.count, int) or shard.count < 0:
            raise IndexFormatError(f"manifest.json gives shard {shard.name!r} a count of {shard.count!r}")


def read_manifest(index_dir: str | os.PathLike) -> Manifest:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"{index_dir} is not a Loupe index (no {MANIFEST}); build one with `loupe index`")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise IndexFormatError(f"{path} is not UTF-8 text (byte {exc.start}); the manifest is damaged — "
                               f"{REPAIR_HINT}") from None
    except ValueError as exc:
        raise IndexFormatError(f"{path} is not valid JSON ({exc}); the manifest is damaged — {REPAIR_HINT}") from None
    except OSError as exc:
        raise IndexFormatError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not isinstance(obj, dict):
        raise IndexFormatError(f"{path} is not a JSON object; the manifest is damaged — {REPAIR_HINT}")
    try:
        return Manifest.from_json(obj)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, IndexFormatError):
            raise
        raise IndexFormatError(f"{path} is unreadable ({type(exc).__name__}: {exc}); {REPAIR_HINT}") from None


def write_manifest(index_dir: str | os.PathLike, manifest: Manifest, *, record_files: bool = True) -> None:
    """Replace the manifest (atomically). ``record_files``: first record the size and checksum of every
    file the manifest lists that it has no record of (files written by an older Loupe, or by code that
    does not pass ``atomic_write_with``'s records on)."""
    manifest.updated = now_iso()
    if record_files:
        for rel, _required in index_files(manifest):
            if rel not in manifest.files:
                path = Path(index_dir) / rel
                if path.is_file():
                    manifest.files[rel] = file_record(path)
    atomic_write_json(Path(index_dir) / MANIFEST, manifest.to_json())


def index_files(manifest: Manifest) -> list[tuple[str, bool]]:
    """Every file of the index the readers open, relative to its folder, with whether it must exist:
    metadata and vectors of every listed shard, local features (and their PCA) of encoders that have them,
    an IVF-PQ encoder's trained quantizer (``trained.faiss``, read by the writer; optional), and each
    encoder's searchable layout (``search-NNNNN.faiss`` [+ ``.ivfdata``], from ``loupe optimize``)."""
    out = []
    for shard in manifest.shards:
        out.append((f"{META_DIR}/{shard.name}.parquet", True))
        for name, entry in manifest.encoders.items():
            out.append((f"{name}/{shard.name}.faiss", True))
            if entry.local_features is not None:
                out.extend((f"{name}/{shard.name}{suffix}", True) for suffix in LOCAL_SUFFIXES)
    for name, entry in manifest.encoders.items():
        if entry.local_features is not None:
            out.append((f"{name}/local-pca.npz", bool(manifest.shards)))
        if entry.index_type == "ivfpq":
            out.append((f"{name}/trained.faiss", False))
    layouts = manifest.extra.get("search_layout") if isinstance(manifest.extra, dict) else None
    for name, layout in (layouts or {}).items():      # `loupe optimize` (retrieval.index.optimize)
        if name in manifest.encoders and isinstance(layout, dict) and isinstance(layout.get("file"), str):
            out.extend((f"{name}/{f}", True) for f in (layout["file"], layout.get("data_file")) if isinstance(f, str))
    return out


def check_size(index_dir, manifest: Manifest | None, path, *, size: int | None = None) -> None:
    """Raise ``IndexFormatError`` when ``path``'s size is not the one recorded (or a previous one).
    Unrecorded files (older indexes) are not checked."""
    if manifest is None or not manifest.files:
        return
    rec = manifest.files.get(relative(index_dir, path))
    if rec is None:
        return
    if size is None:
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise IndexFormatError(f"{path} is missing; the index is incomplete — {REPAIR_HINT}") from None
    sizes = [rec["size"]] + [p["size"] for p in rec.get("previous", [])]
    if size not in sizes:
        raise IndexFormatError(f"{path} is {size} bytes but was written with {rec['size']}: it was truncated or "
                               f"changed after indexing — {REPAIR_HINT}")


def check_digest(index_dir, manifest: Manifest | None, path, record: dict[str, Any]) -> bool | None:
    """Whether ``record`` (the file's size and SHA-256 now) is the recorded one (or a previous one);
    ``None`` when the manifest has no record of the file."""
    rec = manifest.files.get(relative(index_dir, path)) if manifest is not None else None
    if rec is None:
        return None
    return any(r["size"] == record["size"] and r["sha256"] == record["sha256"] for r in [rec, *rec.get("previous", [])])


# -- paths -------------------------------------------------------------------------------------
def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def meta_path(index_dir, shard: str) -> Path:
    return Path(index_dir) / META_DIR / f"{shard}.parquet"


def vectors_path(index_dir, encoder: str, shard: str) -> Path:
    return Path(index_dir) / encoder / f"{shard}.faiss"


LOCAL_SUFFIXES = (".local.npy", ".local-pos.npy", ".local-off.npy")


def local_paths(index_dir, encoder: str, shard: str) -> tuple[Path, Path, Path]:
    base = Path(index_dir) / encoder
    return tuple(base / f"{shard}{suffix}" for suffix in LOCAL_SUFFIXES)


def pca_path(index_dir, encoder: str) -> Path:
    return Path(index_dir) / encoder / "local-pca.npz"


# -- metadata ----------------------------------------------------------------------------------
def metadata_table(rows: Iterable[dict[str, Any]]):
    """Rows (dicts with METADATA_COLUMNS) → a pyarrow table with a fixed schema."""
    import pyarrow as pa

    rows = list(rows)
    schema = pa.schema([
        ("id", pa.string()), ("source", pa.string()), ("path", pa.string()), ("caption", pa.string()),
        ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()), ("size", pa.int64()),
        ("mtime", pa.float64()), ("aliases", pa.string()), ("extra", pa.string()),
    ])
    cols = {}
    for name in schema.names:
        values = [r.get(name) for r in rows]
        if name in ("aliases", "extra"):
            values = [v if isinstance(v, str) or v is None else json.dumps(v, default=str) for v in values]
        cols[name] = values
    return pa.table(cols, schema=schema)


def write_metadata(index_dir, shard: str, rows: Iterable[dict[str, Any]], *,
                   before_replace=None) -> dict[Path, dict[str, Any]]:
    """Write one shard's metadata; returns ``{path: record}`` for ``Manifest.record_all``."""
    import pyarrow.parquet as pq

    table = metadata_table(rows)
    path = meta_path(index_dir, shard)
    return {path: atomic_write_with(path, lambda tmp: pq.write_table(table, tmp), before_replace=before_replace)}


def read_metadata(index_dir, shard: str, manifest: Manifest | None = None):
    """One shard's metadata table. Its ids are checked (15 lowercase hex chars, unique); with the
    ``manifest``, also the file's recorded size and checksum (the file is read whole anyway) and its row
    count. Raises ``IndexFormatError``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = meta_path(index_dir, shard)
    try:
        if manifest is not None and manifest.files.get(relative(index_dir, path)) is not None:
            data = path.read_bytes()
            check_size(index_dir, manifest, path, size=len(data))
            if not check_digest(index_dir, manifest, path, {"size": len(data), "sha256": sha256_bytes(data)}):
                raise IndexFormatError(f"metadata shard {path} does not match its checksum: it was changed or "
                                       f"damaged after indexing — {REPAIR_HINT}")
            table = pq.read_table(pa.BufferReader(data))
        else:
            table = pq.read_table(path)
    except FileNotFoundError:
        raise IndexFormatError(f"missing metadata shard {path}; the index is incomplete — {REPAIR_HINT}") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise IndexFormatError(f"metadata shard {path} is unreadable: {exc}") from exc
    check_ids(table, path)
    if manifest is not None:
        count = next((s.count for s in manifest.shards if s.name == shard), None)
        if count is not None and table.num_rows != count:
            raise IndexFormatError(f"{path}: {table.num_rows} metadata rows, the manifest says {count}; {REPAIR_HINT}")
    return table


def check_ids(table, path, *, unique: bool = False) -> None:
    """Every id of a metadata table is 15 lowercase hex characters; a repeated id is an error when
    ``unique`` (``loupe verify``), else a warning (Loupe's indexer never writes one; the second row is
    only unreachable by id)."""
    import pyarrow.compute as pc

    if "id" not in table.column_names:
        raise IndexFormatError(f"metadata shard {path} has no 'id' column; {REPAIR_HINT}")
    ids = table.column("id")
    if ids.null_count or not pa_all(pc.match_substring_regex(ids, r"^[0-9a-f]{15}$")):
        bad = next(i for i in ids.to_pylist() if not isinstance(i, str) or not ID_PATTERN.fullmatch(i))
        raise IndexFormatError(f"metadata shard {path} holds an id {bad!r}: ids are 15 lowercase hex characters; "
                               f"the file is damaged — {REPAIR_HINT}")
    if pc.count_distinct(ids).as_py() != len(ids):
        if unique:
            raise IndexFormatError(f"metadata shard {path} lists an id twice; {REPAIR_HINT}")
        log.warning("metadata shard %s lists an id twice (the second row is unreachable by id)", path)


def pa_all(mask) -> bool:
    import pyarrow.compute as pc

    return len(mask) == 0 or bool(pc.all(mask).as_py())
