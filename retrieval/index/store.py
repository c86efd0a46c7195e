"""The on-disk index format: manifest, FAISS shards, Parquet metadata, local features.

Layout of an index directory ``DIR``::

    DIR/manifest.json                      format version, encoders, shards, counts, times (written last)
    DIR/.lock                              held by a writing `loupe index` (fcntl lock)
    DIR/meta/shard-NNNNN.parquet           one metadata row per image of the shard
    DIR/<encoder>/shard-NNNNN.faiss        the shard's vectors; vector i <-> metadata row i
    DIR/<encoder>/shard-NNNNN.local.npy    (optional) float16 [total_tokens, c] reduced local descriptors
    DIR/<encoder>/shard-NNNNN.local-pos.npy   int16 [total_tokens, 2] (row, col) on the encoder's grid
    DIR/<encoder>/shard-NNNNN.local-off.npy   int64 [n + 1]: image i owns tokens off[i]:off[i+1]
    DIR/<encoder>/local-pca.npz            (optional) mean [C], components [c, C] of the reduction

Every shard holds the same images, in the same order, for every encoder of the index. Metadata
columns: ``id`` (15 hex chars = first 60 bits of the SHA-256 of the file's bytes: re-indexing the
same content gives the same id), ``source`` (path or URL), ``path`` (absolute path, if a file),
``caption``, ``width``, ``height``, ``sha256``, ``size`` (bytes), ``mtime``, ``aliases`` (other
sources with identical content, JSON list) and ``extra`` (JSON object of manifest columns).

Vectors are L2-normalised float32; the metric is inner product (= cosine). Every file is written to
a temporary name then renamed into place (``os.replace``), and the manifest is replaced last, so a
crash at any moment leaves the previous state readable: readers only trust shards the manifest lists.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from retrieval.errors import IndexFormatError, UnknownEncoderError

FORMAT_NAME = "loupe-index"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
META_DIR = "meta"
ID_HEX = 15  # 60 bits: fits a positive int64 exactly

SHARD_NAME = re.compile(r"shard-[0-9]{5,9}")                         # what ``shard_name`` writes (fullmatch)
ENCODER_DIR = re.compile(r"[^./\\\x00-\x1f][^/\\\x00-\x1f]{0,127}")    # an encoder's folder name (fullmatch)

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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_with(path: str | os.PathLike, writer) -> None:
    """Call ``writer(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


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
        }

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
        )
        check_names(manifest)
        return manifest


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
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise IndexFormatError(f"{path} is unreadable: {exc}") from exc


def write_manifest(index_dir: str | os.PathLike, manifest: Manifest) -> None:
    manifest.updated = now_iso()
    atomic_write_json(Path(index_dir) / MANIFEST, manifest.to_json())


# -- paths -------------------------------------------------------------------------------------
def shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def meta_path(index_dir, shard: str) -> Path:
    return Path(index_dir) / META_DIR / f"{shard}.parquet"


def vectors_path(index_dir, encoder: str, shard: str) -> Path:
    return Path(index_dir) / encoder / f"{shard}.faiss"


def local_paths(index_dir, encoder: str, shard: str) -> tuple[Path, Path, Path]:
    base = Path(index_dir) / encoder
    return base / f"{shard}.local.npy", base / f"{shard}.local-pos.npy", base / f"{shard}.local-off.npy"


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


def write_metadata(index_dir, shard: str, rows: Iterable[dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    table = metadata_table(rows)
    atomic_write_with(meta_path(index_dir, shard), lambda tmp: pq.write_table(table, tmp))


def read_metadata(index_dir, shard: str):
    import pyarrow.parquet as pq

    path = meta_path(index_dir, shard)
    try:
        return pq.read_table(path)
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"metadata shard {path} is unreadable: {exc}") from exc


# -- vectors -----------------------------------------------------------------------------------
def write_vectors(index_dir, encoder: str, shard: str, index) -> None:
    import faiss

    if isinstance(index, faiss.IndexBinary):
        atomic_write_with(vectors_path(index_dir, encoder, shard), lambda tmp: faiss.write_index_binary(index, tmp))
    else:
        atomic_write_with(vectors_path(index_dir, encoder, shard), lambda tmp: faiss.write_index(index, tmp))


def read_vectors(index_dir, encoder: str, shard: str, *, mmap: bool = True, binary: bool = False):
    """Read a shard's FAISS index, memory-mapped where the index type allows."""
    import faiss

    path = str(vectors_path(index_dir, encoder, shard))
    if not os.path.isfile(path):
        raise IndexFormatError(f"missing vector shard {path}; the index is incomplete — rerun `loupe index`")
    try:
        if binary:
            return faiss.read_index_binary(path)
        if mmap:
            try:
                return faiss.read_index(path, faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
            except RuntimeError:
                pass
        return faiss.read_index(path)
    except RuntimeError as exc:
        raise IndexFormatError(f"vector shard {path} is unreadable: {exc}") from exc


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


# -- local features ----------------------------------------------------------------------------
@dataclass
class LocalReducer:
    """PCA reduction of local descriptors (learned on a sample), then L2 normalisation."""

    mean: np.ndarray        # [C]
    components: np.ndarray  # [c, C]

    @classmethod
    def fit(cls, sample: np.ndarray, dim: int = 128, seed: int = 0) -> "LocalReducer":
        sample = np.asarray(sample, dtype=np.float32)
        if sample.shape[1] <= dim:
            return cls(np.zeros(sample.shape[1], np.float32), np.eye(sample.shape[1], dtype=np.float32))
        rng = np.random.default_rng(seed)
        if len(sample) > 50_000:
            sample = sample[rng.choice(len(sample), 50_000, replace=False)]
        mean = sample.mean(axis=0)
        _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
        k = min(dim, vt.shape[0])
        return cls(mean.astype(np.float32), vt[:k].astype(np.float32))

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, tokens: np.ndarray) -> np.ndarray:
        out = (np.asarray(tokens, dtype=np.float32) - self.mean) @ self.components.T
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        return (out / np.maximum(norms, 1e-12)).astype(np.float32)

    def save(self, path) -> None:
        def _w(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, mean=self.mean, components=self.components)
        atomic_write_with(path, _w)

    @classmethod
    def load(cls, path) -> "LocalReducer":
        with np.load(path) as z:
            return cls(z["mean"], z["components"])


def write_local(index_dir, encoder: str, shard: str, per_image: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write one shard's local features: per image ``(descriptors [p, c], positions [p, 2])``."""
    desc_p, pos_p, off_p = local_paths(index_dir, encoder, shard)
    counts = [len(d) for d, _ in per_image]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    dim = per_image[0][0].shape[1] if per_image and counts[0] else 0
    desc = (np.concatenate([d for d, _ in per_image]) if sum(counts) else np.zeros((0, dim))).astype(np.float16)
    pos = (np.concatenate([p for _, p in per_image]) if sum(counts) else np.zeros((0, 2))).astype(np.int16)
    for path, arr in ((desc_p, desc), (pos_p, pos), (off_p, offsets)):
        atomic_write_with(path, lambda tmp, a=arr: np.save(tmp, a))


class LocalShard:
    """Memory-mapped local features of one shard."""

    def __init__(self, index_dir, encoder: str, shard: str):
        desc_p, pos_p, off_p = local_paths(index_dir, encoder, shard)
        try:
            self.desc = np.load(desc_p, mmap_mode="r")
            self.pos = np.load(pos_p, mmap_mode="r")
            self.off = np.load(off_p)
        except (OSError, ValueError) as exc:
            raise IndexFormatError(f"local features of {encoder}/{shard} are unreadable: {exc}") from exc

    def get(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.off[row]), int(self.off[row + 1])
        return np.asarray(self.desc[a:b], dtype=np.float32), np.asarray(self.pos[a:b], dtype=np.int64)
