"""The query engine: opens an index directory read-only and answers queries.

>>> engine = Engine("~/loupe-index")
>>> engine.search(text="a cat", k=10).hits            # [Hit(id, score, shard, row), ...]
>>> engine.search(image=open("q.jpg", "rb").read(), instruction="at night")
>>> engine.search(text=["+a cat", "-a dog", "0.5:snow"])     # weighted terms (rclip style)
>>> engine.search(text="a cat", filter={"width": {"gte": 640}, "caption": {"contains": "cat"}})

* FAISS shards are memory-mapped where the index type allows (``store.read_vectors``); metadata
  comes from the Parquet shards. Startup time and resident memory are logged.
* Every shard is searched with a ``SearchParameters`` built for the call (``nprobe``/``efSearch``
  and the filter's ``IDSelector``); per-shard top-k lists are merged with ``faiss.ResultHeap``. With
  exact (flat) shards the result equals one ``IndexFlatIP`` over all vectors.
* Text goes to the index's first text-capable encoder; image queries to the encoder chosen per
  request (default: that same text-capable one). Encoders load once, on first use, and are safe
  to call from many threads (each holds its own lock).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from . import store
from .errors import InvalidQueryError, LoupeError, UnknownEncoderError, UnknownIdError, UnsupportedModalityError
from .filters import filter_key, filter_mask, parse_filter
from .query import Hit, QueryContext, SearchResponse, as_query_vector, combine, parse_terms
from .search import SearchConfig, index_kind, make_params, merge_topk, search_index

__all__ = ["Engine", "Hit", "QueryContext", "SearchResponse", "RerankUnavailableError"]

log = logging.getLogger("loupe.engine")

MAX_K = 1000
DEFAULT_DEDUP_THRESHOLD = 0.98
PARALLEL_MIN_VECTORS = 200_000   # below this, searching shards one after another is faster
RERANK_CANDIDATES = 100       # global candidates handed to the re-ranker (at least 4k)
TEXT_CACHE_SIZE = 2048


class RerankUnavailableError(LoupeError):
    code = "rerank_unavailable"
    http_status = 400


_FAISS = None


def _faiss():
    global _FAISS
    if _FAISS is None:
        import faiss

        _FAISS = faiss
    return _FAISS


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def _json_field(raw: Any, default: Any) -> Any:
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return default


class Engine:
    """Read-only view of an index directory that answers text, image, id and vector queries."""

    def __init__(self, index_dir: str | os.PathLike, *, device: str = "auto", mmap: bool = True,
                 search_defaults: dict[str, Any] | None = None):
        t0 = time.perf_counter()
        rss0 = _rss_mb()
        self.index_dir = Path(index_dir).expanduser()
        self._mmap = mmap
        self.manifest_mtime = _mtime(self.index_dir / store.MANIFEST)
        self.device = device
        self.manifest: store.Manifest = store.read_manifest(self.index_dir)
        if not self.manifest.encoders:
            raise store.IndexFormatError(f"{self.index_dir}: the manifest lists no encoders")
        self.search_defaults = SearchConfig.from_any(
            search_defaults or self.manifest.extra.get("search_params") or None)
        self._lock = threading.RLock()
        self._encoders: dict[str, Any] = {}
        self._local: dict[tuple[str, int], store.LocalShard] = {}
        self._direct_map_done: set[tuple[str, int]] = set()
        self._text_cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._mask_cache: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._extra_cache: list[dict] = []

        # metadata
        self.shard_names = [s.name for s in self.manifest.shards]
        self.tables = []
        counts = []
        for entry in self.manifest.shards:
            table = store.read_metadata(self.index_dir, entry.name)
            if table.num_rows != entry.count:
                raise store.IndexFormatError(
                    f"{entry.name}: metadata has {table.num_rows} rows, the manifest says {entry.count}; "
                    "rerun `loupe index` to repair the index")
            self.tables.append(table)
            counts.append(table.num_rows)
            self._extra_cache.append({})
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64) if counts else np.zeros(1, np.int64)
        self.shard_ids: list[list[str]] = [t.column("id").to_pylist() for t in self.tables]
        ints = np.array([store.id_to_int(i) for ids in self.shard_ids for i in ids], dtype=np.int64)
        self._id_order = np.argsort(ints, kind="stable")
        self._id_sorted = ints[self._id_order]

        # vectors
        self.indexes: dict[str, list[Any]] = {}
        for name, entry in self.manifest.encoders.items():
            shards = []
            for i, shard in enumerate(self.shard_names):
                index = store.read_vectors(self.index_dir, name, shard, mmap=mmap,
                                           binary=entry.index_type == "binary")
                if index.ntotal != counts[i]:
                    raise store.IndexFormatError(
                        f"{name}/{shard}: {index.ntotal} vectors for {counts[i]} metadata rows; "
                        "rerun `loupe index` to repair the index")
                shards.append(index)
            self.indexes[name] = shards
        self._kinds = {name: [index_kind(ix) for ix in shards] for name, shards in self.indexes.items()}
        workers = min(len(self.shard_names), os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loupe-shard") if workers > 1 else None
        self.open_seconds = time.perf_counter() - t0
        self.open_rss_mb = _rss_mb() - rss0
        log.info("opened %s: %d images in %d shards, encoders %s, in %.2f s (+%.0f MB resident, %.0f MB total)",
                 self.index_dir, self.count, len(self.shard_names), ", ".join(self.indexes),
                 self.open_seconds, self.open_rss_mb, _rss_mb())

    # -- description -----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    @property
    def encoder_names(self) -> list[str]:
        return list(self.manifest.encoders)

    @property
    def text_encoder(self) -> str | None:
        return self.manifest.text_encoder

    @property
    def default_encoder(self) -> str:
        return self.manifest.default_encoder

    def index_bytes(self) -> int:
        """Bytes on disk of the vector shards and metadata."""
        total = 0
        for name in self.manifest.encoders:
            for shard in self.shard_names:
                p = store.vectors_path(self.index_dir, name, shard)
                total += p.stat().st_size if p.exists() else 0
        for shard in self.shard_names:
            p = store.meta_path(self.index_dir, shard)
            total += p.stat().st_size if p.exists() else 0
        return total

    def _entry(self, encoder: str | None) -> store.EncoderEntry:
        name = encoder or self.default_encoder
        if not isinstance(name, str) or name not in self.manifest.encoders:
            raise UnknownEncoderError(
                f"encoder {name!r} is not in this index; it has: {', '.join(self.manifest.encoders)}")
        return self.manifest.encoders[name]

    def encoder(self, name: str | None = None):
        """The encoder ``name`` of this index (``None`` = default), loaded once and cached."""
        entry = self._entry(name)
        enc = self._encoders.get(entry.name)
        if enc is None:
            with self._lock:
                enc = self._encoders.get(entry.name)
                if enc is None:
                    from .encoders import create_encoder

                    t0 = time.perf_counter()
                    enc = create_encoder(entry.name, device=self.device)
                    if enc.dim != entry.dim:
                        raise store.IndexFormatError(
                            f"encoder {entry.name} gives {enc.dim}-d vectors but the index holds {entry.dim}-d")
                    log.info("loaded encoder %s in %.1f s", entry.name, time.perf_counter() - t0)
                    self._encoders[entry.name] = enc
        return enc

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

    def has_id(self, image_id: str) -> bool:
        try:
            self.locate(image_id)
            return True
        except UnknownIdError:
            return False

    def hit_for_id(self, encoder: str, image_id: str) -> Hit:
        """A ``Hit`` for an indexed image, scored against nothing (score 0)."""
        self._entry(encoder)
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
        from .images import load_image

        try:
            return load_image(self.source_file(image_id))
        except UnknownIdError:
            return load_image(self.source_bytes(image_id))

    # -- vectors ------------------------------------------------------------------------------------
    def _reconstruct(self, encoder: str, shard: int, row: int) -> np.ndarray:
        import faiss

        entry = self._entry(encoder)
        index = self.indexes[entry.name][shard]
        if entry.index_type == "binary":
            bits = np.unpackbits(index.reconstruct(int(row)))
            return (np.where(bits > 0, 1.0, -1.0) / np.sqrt(bits.size)).astype(np.float32)
        try:
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)
        except RuntimeError:
            key = (entry.name, shard)
            with self._lock:
                if key not in self._direct_map_done:
                    ivf = faiss.try_extract_index_ivf(index)
                    if ivf is None:
                        raise
                    ivf.make_direct_map()   # once, at first use; never per request
                    self._direct_map_done.add(key)
            return np.asarray(index.reconstruct(int(row)), dtype=np.float32)

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        """Stored vectors of ``hits`` in ``encoder``'s space, [n, d] float32."""
        entry = self._entry(encoder)
        if not hits:
            return np.zeros((0, entry.dim), dtype=np.float32)
        return np.stack([self._reconstruct(entry.name, h.shard, h.row) for h in hits]).astype(np.float32)

    def all_vectors(self, encoder: str | None = None) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors: ``(shard number, [n, d] float32, ids)`` (for de-duplication)."""
        entry = self._entry(encoder)
        for i, index in enumerate(self.indexes[entry.name]):
            if entry.index_type == "binary":
                codes = index.reconstruct_n(0, index.ntotal) if index.ntotal else np.zeros((0, index.d // 8), np.uint8)
                bits = np.unpackbits(codes, axis=1)
                vecs = (np.where(bits > 0, 1.0, -1.0) / np.sqrt(max(bits.shape[1], 1))).astype(np.float32)
            else:
                vecs = store.reconstruct_all(index)
            yield i, vecs, list(self.shard_ids[i])

    def local_features(self, encoder: str, hits: Sequence[Hit]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Stored local descriptors of ``hits``: ``(desc [p, c] float32, pos [p, 2] (row, col))`` each."""
        entry = self._entry(encoder)
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

    # -- embedding ----------------------------------------------------------------------------------
    def embed_texts(self, encoder: str, texts: Sequence[str]) -> np.ndarray:
        """Text vectors (cached: repeated queries skip the text model)."""
        enc = self.encoder(encoder)
        out: list[np.ndarray | None] = []
        missing = []
        with self._lock:
            for t in texts:
                v = self._text_cache.get((enc.name, t))
                if v is not None:
                    self._text_cache.move_to_end((enc.name, t))
                else:
                    missing.append(t)
                out.append(v)
        if missing:
            new = enc.encode_texts(list(dict.fromkeys(missing)))
            fresh = dict(zip(dict.fromkeys(missing), new))
            with self._lock:
                for t, v in fresh.items():
                    self._text_cache[(enc.name, t)] = v
                while len(self._text_cache) > TEXT_CACHE_SIZE:
                    self._text_cache.popitem(last=False)
            out = [v if v is not None else fresh[t] for v, t in zip(out, texts)]
        return np.stack(out).astype(np.float32)

    def embed(self, *, text: str | Sequence[str] | None = None, image: bytes | Image.Image | None = None,
              image_id: str | None = None, vector: Any = None, instruction: str | None = None,
              encoder: str | None = None, weight: float | None = None, method: str = "auto",
              keep_local: bool = False, **opts: Any) -> QueryContext:
        """Embed a query into one unit vector (see ``search`` for the meaning of each field)."""
        from .images import load_image

        given = [n for n, v in (("text", text), ("image", image), ("image_id", image_id), ("vector", vector))
                 if v is not None]
        if not given:
            raise InvalidQueryError("missing query: give text, image, image_id or vector")
        if image is not None and image_id is not None:
            raise InvalidQueryError("give either image or image_id, not both")
        if vector is not None and len(given) > 1:
            raise InvalidQueryError("a raw vector query cannot be combined with text or images")
        if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
            raise InvalidQueryError("instruction must be a non-empty string")
        has_image = image is not None or image_id is not None
        if instruction is not None and not has_image:
            if text is None:
                raise InvalidQueryError("an instruction needs an image (image or image_id) to apply to")
        if text is not None and has_image and instruction is None:
            # "this image, but ..." – the text acts as the instruction
            if not isinstance(text, str):
                raise InvalidQueryError("with an image, text must be one string (it acts as the instruction)")
            instruction, text = text, None

        # routing
        if text is not None or instruction is not None:
            named = self._entry(encoder) if encoder is not None else None
            if named is not None and not named.supports_text and not (
                    "colour" in named.modalities and text is not None and instruction is None):
                # (colour-names answers colour phrases when named: encoder="colour-names", text="red")
                raise UnsupportedModalityError(
                    f"encoder {encoder!r} embeds images only; text goes to {self.text_encoder!r}"
                    if self.text_encoder else f"encoder {encoder!r} embeds images only")
            name = encoder or self.text_encoder
            if name is None:
                raise UnsupportedModalityError(
                    "this index has no text-capable encoder; index with e.g. --encoder conse-effnet-lite0 "
                    "or clip-vit-b-32 to search by text")
        else:
            name = encoder or self.default_encoder
        entry = self._entry(name)

        ctx = QueryContext(vector=np.zeros(entry.dim, np.float32), encoder=entry.name, image_id=image_id,
                           instruction=instruction)
        if vector is not None:
            ctx.vector = as_query_vector(vector, entry.dim)
            return ctx
        if text is not None:
            terms = parse_terms(text)
            ctx.terms = terms
            ctx.text = text if isinstance(text, str) else " ".join(text)
            vecs = self.embed_texts(entry.name, [t for _, t in terms])
            ctx.vector = combine(vecs, [w for w, _ in terms])
            return ctx
        # image (bytes / PIL) or indexed image
        if image is not None:
            pil = load_image(image)
            ctx.image = pil
            enc = self.encoder(entry.name)
            fine = (entry.local_features or {}).get("layer") == "fine" and "fine" in enc.local_layers
            if keep_local and fine:
                # one forward pass: the global vector, the final map (regions) and the fine map (matching)
                vecs, tokens, grid, ftok, fgrid = enc.encode_images_and_fine([pil])
                img_vec, ctx.local, ctx.local_fine = vecs[0], (tokens[0], grid), (ftok[0], fgrid)
            elif keep_local and enc.has_local_features and not enc.binary:
                # one forward pass gives the global vector and the tokens re-ranking needs
                vecs, tokens, grid = enc.encode_images_and_local([pil])
                img_vec, ctx.local = vecs[0], (tokens[0], grid)
            else:
                img_vec = enc.encode_images([pil])[0]
        else:
            shard, row = self.locate(image_id)
            img_vec = self._reconstruct(entry.name, shard, row)
            ctx._image_loader = lambda iid=image_id: self.load_image(iid)
        if instruction is not None:
            from .compose import compose_query

            ctx.terms = parse_terms(instruction) if instruction.lstrip()[:1] in "+-" else [(1.0, instruction.strip())]
            txt = combine(self.embed_texts(entry.name, [t for _, t in ctx.terms]), [w for w, _ in ctx.terms])
            method = instruction_method(method, weight)
            kwargs: dict[str, Any] = {"method": method}
            if method and method != "sum":   # arithmetic / caption / fused need the encoder and the words
                kwargs.update(encoder=self.encoder(entry.name), instruction=instruction, index_dir=self.index_dir)
            if weight is not None:
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0.0 <= weight <= 1.0:
                    raise InvalidQueryError("weight must be a number in [0, 1]")
                kwargs["weight"] = float(weight)
            ctx.vector = np.asarray(compose_query(img_vec, txt, **kwargs), dtype=np.float32).reshape(-1)
            ctx.image_vector = (img_vec / max(float(np.linalg.norm(img_vec)), 1e-12)).astype(np.float32)
        else:
            norm = float(np.linalg.norm(img_vec))
            ctx.vector = (img_vec / max(norm, 1e-12)).astype(np.float32)
        return ctx

    # -- search -------------------------------------------------------------------------------------
    def _masks(self, filter: Any) -> list[np.ndarray] | None:
        conditions = parse_filter(filter)
        if not conditions:
            return None
        key = filter_key(conditions)
        with self._lock:
            masks = self._mask_cache.get(key)
            if masks is not None:
                self._mask_cache.move_to_end(key)
                return masks
        masks = [filter_mask(t, conditions, self._extra_cache[i]) for i, t in enumerate(self.tables)]
        with self._lock:
            self._mask_cache[key] = masks
            while len(self._mask_cache) > 64:
                self._mask_cache.popitem(last=False)
        return masks

    def search_vector(self, encoder: str, vector: Any, k: int, *, params: Any = None,
                      filter: Any = None) -> list[Hit]:
        """Global top-``k`` hits of a query vector over every shard of ``encoder``."""
        entry = self._entry(encoder)
        k = _check_k(k, MAX_K * 4)
        q = np.ascontiguousarray(np.asarray(vector, dtype=np.float32).reshape(1, -1))
        if q.shape[1] != entry.dim:
            raise InvalidQueryError(f"query vector has {q.shape[1]} dimensions; {entry.name} needs {entry.dim}")
        config = SearchConfig.from_any(params)
        if config.nprobe is None or config.ef_search is None:
            config = SearchConfig(nprobe=config.nprobe or self.search_defaults.nprobe,
                                  ef_search=config.ef_search or self.search_defaults.ef_search)
        masks = self._masks(filter) if filter else None
        indexes = self.indexes[entry.name]
        kinds = self._kinds[entry.name]
        jobs = []
        for i, index in enumerate(indexes):
            if index.ntotal == 0 or (masks is not None and not masks[i].any()):
                continue
            jobs.append(i)

        def run(i: int):
            index, sel, bitmap = indexes[i], None, None
            if masks is not None and not masks[i].all():
                bitmap = np.packbits(masks[i], bitorder="little")
                sel = _faiss().IDSelectorBitmap(len(masks[i]), _faiss().swig_ptr(bitmap))
            p = make_params(index, config, sel, k, kind=kinds[i])
            scores, rows = search_index(index, q, k, p)
            if masks is not None and rows.size:   # defence in depth: selectors are exact, check anyway
                valid = rows >= 0
                valid[valid] = masks[i][rows[valid]]
                rows = np.where(valid, rows, -1)
            del bitmap, sel
            return scores, rows

        if not jobs:
            return []
        if len(jobs) > 1 and self._pool is not None and sum(indexes[i].ntotal for i in jobs) >= PARALLEL_MIN_VECTORS:
            parts = list(self._pool.map(run, jobs))     # FAISS releases the GIL: shards in parallel
        else:
            parts = [run(i) for i in jobs]
        if len(parts) == 1:
            scores, labels = parts[0][0][0], parts[0][1][0] + self.offsets[jobs[0]]
            labels = np.where(parts[0][1][0] >= 0, labels, -1)
        else:
            d, lab = merge_topk(parts, [self.offsets[i] for i in jobs], 1, k)
            scores, labels = d[0], lab[0]
        keep = (labels >= 0) & np.isfinite(scores)
        scores, labels = scores[keep], labels[keep]
        shards = np.searchsorted(self.offsets, labels, side="right") - 1
        rows = labels - self.offsets[shards]
        ids = self.shard_ids
        return [Hit(ids[sh][r], s, sh, r) for s, sh, r in zip(scores.tolist(), shards.tolist(), rows.tolist())]

    def dedup_hits(self, encoder: str, hits: list[Hit], threshold: float = DEFAULT_DEDUP_THRESHOLD) -> list[Hit]:
        """Drop hits whose stored vector is within ``threshold`` cosine of a better-ranked kept hit."""
        if len(hits) < 2:
            return list(hits)
        vecs = self.vectors(encoder, hits)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        kept: list[int] = []
        for i in range(len(hits)):
            if kept and float(np.max(vecs[kept] @ vecs[i])) >= threshold:
                continue
            kept.append(i)
        return [hits[i] for i in kept]

    def search(self, *, text: str | Sequence[str] | None = None, image: bytes | Image.Image | None = None,
               image_id: str | None = None, vector: Any = None, instruction: str | None = None,
               encoder: str | None = None, k: int = 20, rerank: bool = False, filter: Any = None,
               dedup: bool | float = False, params: Any = None, weight: float | None = None,
               method: str = "auto") -> SearchResponse:
        """Embed a query and return the global top-``k``.

        * ``text``: a string, or a list of weighted terms (``"+a cat"``, ``"-a dog"``, ``"0.5:snow"``);
        * ``image``: encoded image bytes (or a PIL image); ``image_id``: an indexed image;
        * ``vector``: a raw embedding in ``encoder``'s space;
        * ``instruction`` (with an image): composed with ``compose_query(weight=, method=)``; text given
          together with an image acts as the instruction;
        * ``filter``: metadata conditions (see ``retrieval.filters``), exact (FAISS id selectors);
        * ``dedup``: drop near-identical results (True = cosine ≥ 0.98, or a threshold in (0, 1]);
        * ``rerank``: re-rank the top candidates with ``retrieval.rerank.rerank_hits``.
        """
        t0 = time.perf_counter()
        k = _check_k(k, MAX_K)
        if not isinstance(rerank, bool):
            raise InvalidQueryError("rerank must be true or false")
        threshold = None
        if dedup is True:
            threshold = DEFAULT_DEDUP_THRESHOLD
        elif dedup not in (False, None, 0):
            if isinstance(dedup, bool) or not isinstance(dedup, (int, float)) or not 0.0 < dedup <= 1.0:
                raise InvalidQueryError("dedup must be true/false or a cosine threshold in (0, 1]")
            threshold = float(dedup)
        parse_filter(filter)  # validate before the (slower) embedding
        ctx = self.embed(text=text, image=image, image_id=image_id, vector=vector, instruction=instruction,
                         encoder=encoder, weight=weight, method=method, keep_local=bool(rerank))
        t1 = time.perf_counter()
        fetch = k
        if rerank:
            fetch = min(max(RERANK_CANDIDATES, 4 * k), MAX_K * 4)
        if threshold is not None:
            fetch = min(fetch * 2 + 10, max(self.count, 1), MAX_K * 4)
        timings: dict[str, float] = {"embed_ms": (t1 - t0) * 1e3}
        fusion = (ctx.instruction is not None and ctx.image_vector is not None
                  and _is_fusion(instruction_method(method, weight)))
        while True:
            if fusion:   # two lists (text, image) pooled and re-scored: retrieval.compose.fusion_search
                from .compose import fusion_search

                hits = fusion_search(self, ctx, max(fetch, 1), params=params, filter=filter)
            else:
                hits = self.search_vector(ctx.encoder, ctx.vector, max(fetch, 1), params=params, filter=filter)
            if threshold is None:
                break
            kept = self.dedup_hits(ctx.encoder, hits, threshold)
            if len(kept) >= k or len(hits) < fetch or fetch >= min(self.count, MAX_K * 4):
                hits = kept
                break
            fetch = min(fetch * 2, self.count, MAX_K * 4)
        t2 = time.perf_counter()
        timings["search_ms"] = (t2 - t1) * 1e3
        if rerank:
            try:
                from .rerank import rerank_hits
            except ImportError as exc:
                raise RerankUnavailableError(
                    "re-ranking is not available in this build (retrieval.rerank is missing)") from exc
            # the query's regions may fetch candidates of their own, with this request's filter and parameters
            # (not after de-duplication, which the region candidates would bypass)
            search = None if threshold is not None else (
                lambda v, n: self.search_vector(ctx.encoder, v, n, params=params, filter=filter))
            hits = list(rerank_hits(self, ctx, hits, k=k, search=search))
            timings["rerank_ms"] = (time.perf_counter() - t2) * 1e3
        hits = hits[:k]
        took = (time.perf_counter() - t0) * 1e3
        return SearchResponse(hits=hits, query=ctx, encoder=ctx.encoder, took_ms=took, timings=timings)

    def changed_on_disk(self) -> bool:
        """True when ``manifest.json`` was replaced since this engine opened it (a new indexing run)."""
        return _mtime(self.index_dir / store.MANIFEST) != self.manifest_mtime

    def reopen(self) -> "Engine":
        """A fresh engine over the current state of the index, sharing the loaded encoders and the
        text-embedding cache (this engine stays valid for requests still using it)."""
        new = Engine(self.index_dir, device=self.device, mmap=self._mmap)
        for name, enc in self._encoders.items():
            if name in new.manifest.encoders and new.manifest.encoders[name].dim == enc.dim:
                new._encoders[name] = enc
        new._text_cache = self._text_cache
        return new

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.indexes.clear()
        self._encoders.clear()
        self._local.clear()


def instruction_method(method: str | None, weight: float | None) -> str:
    """The composition method a query gets: ``auto`` (or none) means ``compose.DEFAULT_METHOD``, except
    that an explicit ``weight`` (the image/text mix of ``sum``) asks for ``sum``."""
    if method in (None, "", "auto") and weight is not None:
        return "sum"
    return method or "auto"


def _is_fusion(method: Any) -> bool:
    if method == "auto":
        from .compose import DEFAULT_METHOD

        method = DEFAULT_METHOD
    return method == "fusion"


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


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


def _check_k(k: Any, limit: int = MAX_K) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidQueryError(f"k must be an integer in 1..{limit}")
    if not 1 <= int(k) <= limit:
        raise InvalidQueryError(f"k must be in 1..{limit}, got {k}")
    return int(k)
