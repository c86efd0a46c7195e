"""Bring your own embeddings: ``loupe index VECTORS.parquet --vectors COLUMN --encoder NAME --out DIR``.

As autofaiss and clip-retrieval's index step, Loupe indexes vectors made elsewhere. The Parquet file is
streamed (``pyarrow.parquet.ParquetFile.iter_batches``, never read whole); each row's ``COLUMN`` holds its
embedding (a list or fixed-size list of floats). Rows are L2-normalised; the other columns are metadata as
for any manifest (``path``/``url`` become the source, ``caption`` the caption, the rest ``extra``). A row's
id is its ``id`` column when that is Loupe's 15 hex characters, else the first 60 bits of the SHA-256 of
its ``id``/``path``/``url`` (so re-running the same file resumes: known ids are skipped).

``NAME`` is a registry encoder of the same dimension (its text tower then answers text queries: vectors
from the same model) or a new name for a vector-only index (queries by indexed id or by vector). A row
with the wrong dimension, NaN/inf values, an all-zero or missing vector is skipped and reported in the
summary's ``failed``, like a bad image. Vectors go through the same ``IndexWriter`` as images: shards,
timed commits, crash safety, ``--prune`` is not needed (a vector file has no files to disappear).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from indexer import index_types
from indexer.runner import IndexSummary
from indexer.sources import Failure
from indexer.writer import IndexWriter, clean_stray_files, load_state
from retrieval.errors import LoupeError
from retrieval.index import store

log = logging.getLogger(__name__)

BATCH_ROWS = 4096
SOURCE_COLUMNS = ("path", "url", "id")
HEX_ID = re.compile(r"[0-9a-f]{%d}" % store.ID_HEX)


def row_id(value: Any) -> str:
    """The Loupe id of a row identified by ``value`` (see module docstring)."""
    text = str(value)
    if HEX_ID.fullmatch(text):
        return text
    return store.content_id(hashlib.sha256(text.encode()).hexdigest())


def check_vector(value: Any, dim: int | None) -> tuple[np.ndarray | None, str | None]:
    """(unit float32 vector, None) or (None, the reason it is refused)."""
    if value is None:
        return None, "no vector"
    try:
        vec = np.asarray(value, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError):
        return None, "the vector is not a list of numbers"
    if vec.size == 0:
        return None, "empty vector"
    if dim is not None and vec.size != dim:
        return None, f"vector has {vec.size} dimensions, the index has {dim}"
    if not np.isfinite(vec).all():
        return None, "vector has NaN or infinite values"
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return None, "vector is all zeros"
    return vec / norm, None


def _open(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise LoupeError(f"{path} does not exist (--vectors needs a Parquet file)")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise LoupeError(f"{path} is not a readable Parquet file: {exc}") from None
    schema = pf.schema_arrow
    if column not in schema.names:
        raise LoupeError(f"{path} has no column {column!r}; it has: {', '.join(schema.names)}")
    kind = schema.field(column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise LoupeError(f"column {column!r} of {path} is {kind}, not a list of floats (one embedding per row)")
    if not any(c in schema.names for c in SOURCE_COLUMNS):
        raise LoupeError(f"{path} needs a 'path', 'url' or 'id' column to identify each row")
    return pf


def _rows(pf, column: str) -> Iterator[dict[str, Any]]:
    for batch in pf.iter_batches(batch_size=BATCH_ROWS):
        yield from batch.to_pylist()


def encoder_entry(name: str, dim: int, expected: int, cfg) -> store.EncoderEntry:
    """The manifest entry of ``name`` for ``dim``-d vectors: a registry encoder must have that dimension."""
    from retrieval.encoders import get_spec
    from retrieval.errors import UnknownEncoderError

    try:
        spec = get_spec(name)
    except (UnknownEncoderError, KeyError):
        spec = None
    if spec is not None and spec.dim != dim:
        raise LoupeError(f"encoder {name} makes {spec.dim}-d vectors but the vectors have {dim}; pass the encoder "
                         "that made them, or a new name for a vector-only index")
    if spec is not None and (spec.extra or {}).get("binary"):
        raise LoupeError(f"encoder {name} makes binary codes; bring float vectors, or use another name")
    modalities = list(spec.modalities) if spec is not None else ["vector"]
    choice = index_types.choose_index_type(expected, dim, requested=cfg.index_type, max_memory=cfg.max_memory,
                                           shard_size=cfg.shard_size)
    return store.EncoderEntry(name=name, dim=dim, index_type=choice.index_type, factory=choice.factory,
                              modalities=modalities)


def index_vectors(cfg, out: Path, summary: IndexSummary, checkpoint: Callable[[str], None] | None = None,
                  progress: Callable[[int, int], None] | None = None) -> None:
    """Index the vectors of ``cfg.sources[0]`` (a Parquet file) under ``cfg.encoders[0]`` into ``out``; the
    caller holds the index lock."""
    if len(cfg.sources) != 1:
        raise LoupeError("--vectors takes one Parquet file as SOURCE")
    if len(cfg.encoders) != 1:
        raise LoupeError("--vectors needs exactly one --encoder NAME (the model that made the vectors, or a new "
                         "name for a vector-only index)")
    name, column = cfg.encoders[0], cfg.vectors
    path = Path(cfg.sources[0])
    pf = _open(path, column)
    manifest = store.read_manifest(out) if (out / store.MANIFEST).is_file() else None
    if manifest is not None and list(manifest.encoders) != [name]:
        raise LoupeError(f"{out} holds encoders {', '.join(manifest.encoders)}; vectors for {name} need a new --out")
    clean_stray_files(out, manifest, [name])
    state = load_state(out, manifest) if manifest else None
    known = set(state.ids) if state else set()
    dim = manifest.encoders[name].dim if manifest else None
    writer = None
    done = indexed = 0
    pending_rows: list[dict[str, Any]] = []
    pending_vecs: list[np.ndarray] = []
    seen: set[str] = set()

    def flush() -> None:
        nonlocal writer, manifest, indexed
        if not pending_rows:
            return
        if writer is None:
            if manifest is None:
                entry = encoder_entry(name, dim, pf.metadata.num_rows, cfg)
                manifest = store.Manifest(encoders={name: entry})
            from indexer.writer import IndexState

            writer = IndexWriter(out, manifest, state or IndexState(), shard_size=cfg.shard_size,
                                 commit_seconds=cfg.commit_seconds, checkpoint=checkpoint)
        writer.add(list(pending_rows), {name: np.stack(pending_vecs)})
        indexed += len(pending_rows)
        pending_rows.clear()
        pending_vecs.clear()

    for row in _rows(pf, column):
        done += 1
        key = next((row.get(c) for c in SOURCE_COLUMNS if row.get(c) not in (None, "")), None)
        source = str(key) if key is not None else f"{path}#row{done - 1}"
        if key is None:
            summary.failed.append(Failure(source, "no path, url or id"))
            continue
        image_id = row_id(row["id"]) if row.get("id") not in (None, "") else row_id(source)
        if image_id in known or image_id in seen:
            summary.skipped += 1
            continue
        vec, reason = check_vector(row.get(column), dim)
        if vec is None:
            summary.failed.append(Failure(source, reason))
            continue
        dim = dim or int(vec.size)
        seen.add(image_id)
        extra = {k: v for k, v in row.items() if k not in (column, "path", "url", "id", "caption")}
        pending_rows.append({"id": image_id, "source": source, "path": row.get("path"), "caption": row.get("caption"),
                             "width": None, "height": None, "sha256": None, "size": None, "mtime": None,
                             "aliases": [], "extra": json.loads(json.dumps(extra, default=str))})
        pending_vecs.append(vec)
        if len(pending_rows) >= BATCH_ROWS:
            flush()
            if progress is not None:
                progress(done, indexed)
    flush()
    if writer is not None:
        writer.finish()
        manifest = writer.manifest
    elif manifest is None:
        raise LoupeError(f"{path}: no usable vector (every row failed: see the summary's 'failed'); nothing indexed")
    summary.indexed = indexed
    summary.shards = len(manifest.shards)
    if progress is not None:
        progress(done, indexed)
