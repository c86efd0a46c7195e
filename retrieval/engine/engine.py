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

This module opens the index and searches it; the engine's other methods live in two mixins:
:mod:`retrieval.engine_records` (ids, metadata, source images, stored vectors) and
:mod:`retrieval.engine_query` (query embedding and routing, the text-vector cache).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from retrieval.colour import naming as colour
from retrieval.compose.fusion import colour_encoder, colour_text_search, colour_words, text_colour
from retrieval.engine.embed import EngineQueries, _is_fusion, instruction_method
from retrieval.engine.query import QueryContext, SearchResponse
from retrieval.errors import InvalidQueryError, LoupeError, UnknownEncoderError
from retrieval.index import store
from retrieval.index.filters import filter_key, filter_mask, parse_filter
from retrieval.index.params import SearchConfig, index_kind, make_params, merge_topk, search_index
from retrieval.index.records import EngineRecords
from retrieval.types import Hit

__all__ = ["Engine", "Hit", "QueryContext", "SearchResponse", "RerankUnavailableError"]

log = logging.getLogger("loupe.engine")

MAX_K = 1000
DEFAULT_DEDUP_THRESHOLD = 0.98
PARALLEL_MIN_VECTORS = 200_000   # below this, searching shards one after another is faster
RERANK_CANDIDATES = 100       # global candidates handed to the re-ranker (at least 4k)


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


class Engine(EngineRecords, EngineQueries):
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
        self._state: dict[Any, Any] = {}
        self._state_lock = threading.Lock()

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

    def cache(self, key: Any, factory: Callable[[], Any]) -> Any:
        """Per-index state (re-rank reducers, copy-detection backgrounds, classifiers ...): ``factory()`` is
        called once per ``key`` and its result kept for this engine's life (a reopened index starts afresh)."""
        with self._state_lock:
            if key in self._state:
                return self._state[key]
        value = factory()
        with self._state_lock:
            return self._state.setdefault(key, value)

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
                    from retrieval.encoders import create_encoder

                    t0 = time.perf_counter()
                    enc = create_encoder(entry.name, device=self.device)
                    if enc.dim != entry.dim:
                        raise store.IndexFormatError(
                            f"encoder {entry.name} gives {enc.dim}-d vectors but the index holds {entry.dim}-d")
                    log.info("loaded encoder %s in %.1f s", entry.name, time.perf_counter() - t0)
                    self._encoders[entry.name] = enc
        return enc

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
        masks = [filter_mask(t, [c for c in conditions if c.field != colour.FILTER_FIELD], self._extra_cache[i])
                 for i, t in enumerate(self.tables)]
        for cond in (c for c in conditions if c.field == colour.FILTER_FIELD):
            masks = self._colour_masks(cond, masks)
        with self._lock:
            self._mask_cache[key] = masks
            while len(self._mask_cache) > 64:
                self._mask_cache.popitem(last=False)
        return masks

    def _colour_masks(self, cond, masks: list[np.ndarray]) -> list[np.ndarray]:
        """``{"colour-names": "red" | ["red", "pink"]}``: keep images showing one of the colours
        (:func:`retrieval.colour.colour_filter_mask`, from the stored colour-names vectors)."""
        name = colour_encoder(self)
        if name is None:
            raise InvalidQueryError(f"filter {colour.FILTER_FIELD!r} needs an index with the colour-names encoder "
                                    "(loupe index ... --encoder colour-names)")
        if cond.op not in ("eq", "in") or not all(isinstance(v, str) for v in
                                                  (cond.value if cond.op == "in" else (cond.value,))):
            raise InvalidQueryError(f"filter {colour.FILTER_FIELD!r} takes a colour or a list of colours, "
                                    'e.g. {"colour-names": "red"}')
        phrases = list(cond.value) if cond.op == "in" else [cond.value]
        return [m & colour.colour_filter_mask(vecs, phrases) if len(vecs) else m
                for m, (_, vecs, _) in zip(masks, self.all_vectors(name))]

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
               method: str = "auto", colour: bool = True) -> SearchResponse:
        """Embed a query and return the global top-``k``.

        * ``text``: a string, or a list of weighted terms (``"+a cat"``, ``"-a dog"``, ``"0.5:snow"``);
        * ``image``: encoded image bytes (or a PIL image); ``image_id``: an indexed image;
        * ``vector``: a raw embedding in ``encoder``'s space;
        * ``instruction`` (with an image): composed with ``compose_query(weight=, method=)``; text given
          together with an image acts as the instruction;
        * ``filter``: metadata conditions (see ``retrieval.filters``), exact (FAISS id selectors);
        * ``dedup``: drop near-identical results (True = cosine ≥ 0.98, or a threshold in (0, 1]);
        * ``rerank``: re-rank the top candidates with ``retrieval.rerank.rerank_hits``;
        * ``colour``: on an index with colour-names, colour words count (a text query naming a colour, a colour
          instruction, an object change keeping the colour); ``False`` searches without the colour scores.
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
        if not isinstance(colour, bool):
            raise InvalidQueryError("colour must be true or false")
        colour_phrase = None
        if colour and not fusion and encoder is None and colour_encoder(self):
            colour_phrase = text_colour(ctx)   # "a red dress" on an index with colour-names: text AND colour
        notes = self._colour_notes(ctx)
        while True:
            if fusion:   # two lists (text, image) pooled and re-scored: retrieval.compose.fusion_search
                from retrieval.compose.fusion import fusion_search

                hits = fusion_search(self, ctx, max(fetch, 1), params=params, filter=filter,
                                     weights=None if colour else {"colour": 0.0, "keep_colour": 0.0})
            elif colour_phrase:
                hits = colour_text_search(self, ctx, colour_phrase, max(fetch, 1), params=params, filter=filter)
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
                from retrieval.rerank.reranker import rerank_hits
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
        return SearchResponse(hits=hits, query=ctx, encoder=ctx.encoder, took_ms=took, timings=timings, notes=notes)

    def _colour_notes(self, ctx) -> list[str]:
        """A note when a query asks for a colour this index cannot see: no colour-names encoder and a text
        encoder that is not CLIP (the offline ConSE encoder cannot tell colours apart)."""
        if colour_encoder(self) is not None or self._entry(ctx.encoder).name.startswith("clip"):
            return []
        if ctx.instruction is not None:
            from retrieval.compose.fusion import instruction_colour

            asked = instruction_colour(ctx.instruction)
        else:
            asked = colour_words(ctx.text) if ctx.text else None
        if not asked:
            return []
        return [f"this index cannot see colours ({ctx.encoder} does not tell {asked!r} from other colours); "
                "re-index with --encoder colour-names to search by colour"]

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


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _check_k(k: Any, limit: int = MAX_K) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidQueryError(f"k must be an integer in 1..{limit}")
    if not 1 <= int(k) <= limit:
        raise InvalidQueryError(f"k must be in 1..{limit}, got {k}")
    return int(k)
