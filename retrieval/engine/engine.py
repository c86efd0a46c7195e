"""The query engine: opens an index directory read-only and answers ``SearchRequest``s.

>>> engine = Engine("~/loupe-index")
>>> engine.search(SearchRequest(text="a cat", k=10)).hits        # [Hit(id, score, shard, row), ...]
>>> engine.search(image=open("q.jpg", "rb").read(), instruction="at night")   # fields → SearchRequest
>>> engine.search(text=["+a cat", "-a dog", "0.5:snow"], filter={"width": {"gte": 640}})

An ``Engine`` is a composition of three parts, each in its own module:

* ``records`` (:class:`retrieval.index.records.RecordStore`): ids, metadata, source files, local features;
* ``shards`` (:class:`retrieval.index.shards.ShardSet`): the FAISS shards per encoder, fan-out and merge;
* ``embedder`` (:class:`retrieval.engine.embed.Embedder`): encoders (loaded on first use) and the text cache.

A query reads top-down in :meth:`Engine.search`: the request (validated when it was built) → the
embedder → the shard set (with the filter's masks) → optional colour / fusion / de-duplication /
re-ranking → a ``SearchResponse``. Per-index state of the other capabilities (copy-detection
backgrounds, classifiers) lives in :meth:`Engine.cache`, not in module globals.

An engine is one version of the index: it opens every file its manifest lists when it is built (the
re-ranking PCA included) and none by path afterwards, so ``loupe index`` may replace and delete them
while it serves; :meth:`Engine.reopen` builds the next version's engine whole, for a server to switch to.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from retrieval.colour import naming as colour
from retrieval.compose.fusion import colour_encoder, colour_text_search, colour_words, instruction_colour, text_colour
from retrieval.engine.embed import Embedder
from retrieval.engine.query import QueryContext, SearchResponse
from retrieval.engine.request import MAX_K, SearchRequest, check_int
from retrieval.errors import IndexFormatError, InvalidQueryError
from retrieval.index import descriptors, store
from retrieval.index.filters import check_fields, filter_key, parse_filter
from retrieval.index.records import RecordStore
from retrieval.index.shards import SearchConfig, ShardSet
from retrieval.types import Hit

__all__ = ["Engine"]

log = logging.getLogger("loupe.engine")

RERANK_CANDIDATES = 100       # global candidates handed to the re-ranker (at least 4k)
MASK_CACHE_SIZE = 64          # filters whose per-shard masks are kept
OPEN_ATTEMPTS = 8             # manifest versions tried when the index changes while it is being opened


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class Engine:
    """Read-only view of an index directory that answers text, image, id, vector and instruction queries."""

    def __init__(self, index_dir: str | os.PathLike, *, device: str = "auto", mmap: bool = True,
                 search_defaults: dict[str, Any] | None = None, search_device: str | None = None):
        t0, rss0 = time.perf_counter(), _rss_mb()
        self.index_dir = Path(index_dir).expanduser()
        self.device = device
        self._mmap = mmap
        # exact (flat) vectors searched on the GPU with device cuda, or auto when one is present
        self.search_device = search_device if search_device is not None else _search_device(device)
        self.manifest_stamp, self.manifest, self.records, self.shards = self._open_version()
        self.region_sets = _open_regions(self)     # `loupe index --regions`: encoder -> RegionSet
        self.search_defaults = SearchConfig.from_any(
            search_defaults or self.manifest.extra.get("search_params") or None)
        self.embedder = Embedder(self.manifest, device=device, index_dir=self.index_dir,
                                 stored_vector=self.stored_vector, load_image=self.records.load_image,
                                 composer=lambda: {"classifiers": _classifiers_of(self)})
        self._mask_cache: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.filter_views: dict[str, Callable[[Any], Any]] | None = None     # set_filter_views
        self._state: dict[Any, Any] = {}
        self._lock = threading.Lock()
        self.open_seconds = time.perf_counter() - t0
        self.open_rss_mb = _rss_mb() - rss0
        log.info("opened %s: %d images in %d shards, encoders %s, in %.2f s (+%.0f MB resident, %.0f MB total)",
                 self.index_dir, self.count, len(self.records.shard_names), ", ".join(self.manifest.encoders),
                 self.open_seconds, self.open_rss_mb, _rss_mb())

    def _open_version(self) -> tuple[tuple | None, store.Manifest, RecordStore, ShardSet]:
        """Open one version of the index whole: its manifest and every file it lists (metadata read, vector
        shards and local features opened or memory-mapped, PCA loaded), so that no query opens a file by
        path later: ``loupe index`` deletes the files of a version once it has replaced the manifest (each
        timed commit, each pruned shard), and an open or mapped file outlives its name.

        A file missing or unreadable because the manifest was replaced meanwhile is not an error: the newer
        version is opened instead (up to ``OPEN_ATTEMPTS`` times). Raises ``IndexFormatError`` otherwise."""
        path = self.index_dir / store.MANIFEST
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            stamp = _stamp(path)
            try:
                manifest = store.read_manifest(self.index_dir)
                if _stamp(path) != stamp:
                    continue                        # replaced while it was read: read the new one
                if not manifest.encoders:
                    raise IndexFormatError(f"{self.index_dir}: the manifest lists no encoders")
                records = RecordStore(self.index_dir, manifest)
                shards = ShardSet(self.index_dir, manifest, records.shard_ids, mmap=self._mmap,
                                  search_device=self.search_device)
                return stamp, manifest, records, shards
            except (IndexFormatError, OSError) as exc:
                if attempt == OPEN_ATTEMPTS or _stamp(path) == stamp:
                    raise                           # the version it read is damaged (or keeps changing)
                log.info("%s changed while it was opened (%s); opening the new version", self.index_dir, exc)
        raise IndexFormatError(f"{path} kept changing while it was read ({OPEN_ATTEMPTS} times); try again")

    # -- what the index holds ----------------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.records.count

    @property
    def encoder_names(self) -> list[str]:
        return list(self.manifest.encoders)

    @property
    def text_encoder(self) -> str | None:
        return self.manifest.text_encoder

    @property
    def default_encoder(self) -> str:
        return self.manifest.default_encoder

    @property
    def shard_names(self) -> list[str]:
        return self.records.shard_names

    def encoder(self, name: str | None = None):
        """The encoder ``name`` of this index (``None`` = default), loaded once and cached."""
        return self.embedder.encoder(name)

    def embed_texts(self, encoder: str, texts: Sequence[str]) -> np.ndarray:
        return self.embedder.embed_texts(encoder, texts)

    def locate(self, image_id: str) -> tuple[int, int]:
        """(shard number, row) of an indexed image; raises ``UnknownIdError``."""
        return self.records.locate(image_id)

    def hit_for_id(self, encoder: str, image_id: str) -> Hit:
        """A ``Hit`` for an indexed image (score 0), checking that ``encoder`` is in the index."""
        self.manifest.entry(encoder)
        return self.records.hit_for_id(image_id)

    def metadata(self, image_id: str) -> dict[str, Any]:
        return self.records.metadata(image_id)

    def describe_hit(self, hit: Hit) -> dict[str, Any]:
        """The JSON shape of a result: ``{id, score, path, caption, metadata}``."""
        return self.records.describe_hit(hit)

    def source_file(self, image_id: str) -> Path:
        return self.records.source_file(image_id)

    def source_bytes(self, image_id: str) -> bytes:
        return self.records.source_bytes(image_id)

    def load_image(self, image_id: str) -> Image.Image:
        return self.records.load_image(image_id)

    def local_features(self, encoder: str, hits: Sequence[Hit]) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.records.local_features(self.manifest.entry(encoder).name, hits)

    def local_reducer(self, encoder: str) -> descriptors.LocalReducer | None:
        """The PCA of ``encoder``'s stored local descriptors (loaded with the index; None without one)."""
        return self.records.local_reducer(self.manifest.entry(encoder).name)

    def stored_vector(self, encoder: str, image_id: str) -> np.ndarray:
        """The stored vector of an indexed image in ``encoder``'s space."""
        shard, row = self.records.locate(image_id)
        return self.shards.reconstruct(self.manifest.entry(encoder).name, shard, row)

    def vectors(self, encoder: str, hits: Sequence[Hit]) -> np.ndarray:
        """Stored vectors of ``hits`` in ``encoder``'s space, ``[n, d]`` float32."""
        return self.shards.vectors(self.manifest.entry(encoder).name, hits)

    def all_vectors(self, encoder: str | None = None) -> Iterator[tuple[int, np.ndarray, list[str]]]:
        """Every shard's vectors: ``(shard number, [n, d] float32, ids)`` (for de-duplication)."""
        return self.shards.all_vectors(self.manifest.entry(encoder).name)

    def cache(self, key: Any, factory: Callable[[], Any]) -> Any:
        """Per-index state (copy-detection backgrounds, classifiers ...): ``factory()`` is
        called once per ``key`` and its result kept for this engine's life (a reopened index starts afresh)."""
        with self._lock:
            if key in self._state:
                return self._state[key]
        value = factory()
        with self._lock:
            return self._state.setdefault(key, value)

    def cached(self, key: Any) -> Any:
        """What :meth:`cache` holds under ``key``, or ``None`` (nothing is created)."""
        with self._lock:
            return self._state.get(key)

    def index_bytes(self) -> int:
        """Bytes on disk of the vector shards and metadata."""
        paths = [store.vectors_path(self.index_dir, name, shard)
                 for name in self.manifest.encoders for shard in self.shard_names]
        paths += [store.meta_path(self.index_dir, shard) for shard in self.shard_names]
        return sum(p.stat().st_size for p in paths if p.exists())

    # -- queries -----------------------------------------------------------------------------------
    def embed(self, request: SearchRequest | None = None, /, *, keep_local: bool = False, **fields: Any
              ) -> QueryContext:
        """Embed a query (a ``SearchRequest``, or its fields) into one unit vector."""
        return self.embedder.embed(_request(request, fields), keep_local=keep_local)

    def search(self, request: SearchRequest | None = None, /, **fields: Any) -> SearchResponse:
        """The global top-``k`` of a ``SearchRequest`` (or of its fields, e.g. ``search(text="a cat")``)."""
        req = _request(request, fields)
        if req.box is not None or req.regions:    # search by region: retrieval/regions/search.py
            from retrieval.regions.search import box_request, search_regions

            if req.box is None:
                return search_regions(self, req)
            cropped, box = box_request(self, req)    # the box as its own query (re-ranking sees only it)
            response = self.search(cropped)
            response.box = box
            return response
        t0 = time.perf_counter()
        masks = self._masks(req.filter)
        ctx = self.embedder.embed(req, keep_local=req.rerank)
        t1 = time.perf_counter()
        threshold = req.dedup_threshold
        want = req.offset + req.k          # a page: ranks offset..offset+k of the same ranking
        fetch = min(max(RERANK_CANDIDATES, 4 * want), MAX_K * 4) if req.rerank else want
        if threshold is not None:
            fetch = min(fetch * 2 + 10, max(self.count, 1), MAX_K * 4)
        fusion = ctx.instruction is not None and ctx.image_vector is not None and _is_fusion(req.composition)
        colour_phrase = None
        if req.colour and not fusion and req.encoder is None and colour_encoder(self):
            colour_phrase = text_colour(ctx)   # "a red dress" on an index with colour-names: text AND colour
        while True:
            if fusion:   # two lists (text, image) pooled and re-scored: retrieval.compose.fusion
                from retrieval.compose.fusion import fusion_search

                hits = fusion_search(self, ctx, max(fetch, 1), params=req.params, filter=req.filter,
                                     weights=None if req.colour else {"colour": 0.0, "keep_colour": 0.0})
            elif colour_phrase:
                hits = colour_text_search(self, ctx, colour_phrase, max(fetch, 1), params=req.params,
                                          filter=req.filter)
            else:
                hits = self._search(ctx.encoder, ctx.vector, max(fetch, 1), req.params, masks)
                if ctx.encoder in self.region_sets:   # regions of the indexed pictures (each hit says where)
                    from retrieval.regions.search import merge_region_hits

                    hits = merge_region_hits(self, self.region_sets[ctx.encoder], ctx.vector, hits,
                                             max(fetch, 1), masks)
            if threshold is None:
                break
            kept = self.dedup_hits(ctx.encoder, hits, threshold)
            if len(kept) >= want or len(hits) < fetch or fetch >= min(self.count, MAX_K * 4):
                hits = kept
                break
            fetch = min(fetch * 2, self.count, MAX_K * 4)
        t2 = time.perf_counter()
        timings = {"embed_ms": (t1 - t0) * 1e3, "search_ms": (t2 - t1) * 1e3}
        if req.rerank:
            from retrieval.rerank.reranker import rerank_hits

            # the query's regions may fetch candidates of their own, with this request's filter and parameters
            # (not after de-duplication, which the region candidates would bypass)
            search = None if threshold is not None else (
                lambda v, n: self._search(ctx.encoder, v, n, req.params, masks))
            hits = list(rerank_hits(self, ctx, hits, k=want, search=search))
            timings["rerank_ms"] = (time.perf_counter() - t2) * 1e3
        kind = "fused_z" if fusion or colour_phrase else "reranked" if req.rerank else "cosine"   # query.SCORE_KINDS
        return SearchResponse(hits=hits[req.offset:want], query=ctx, encoder=ctx.encoder,
                              took_ms=(time.perf_counter() - t0) * 1e3, timings=timings, notes=self._notes(ctx),
                              score_kind=kind)

    def search_vector(self, encoder: str, vector: Any, k: int, *, params: Any = None,
                      filter: Any = None) -> list[Hit]:
        """Global top-``k`` hits of a raw query vector over every shard of ``encoder`` (the building block of
        fusion, colour search, re-ranking's region candidates and copy detection)."""
        entry = self.manifest.entry(encoder)
        k = check_int("k", k, 1, MAX_K * 4)
        q = np.asarray(vector, dtype=np.float32).reshape(-1)
        if q.shape[0] != entry.dim:
            raise InvalidQueryError(f"query vector has {q.shape[0]} dimensions; {entry.name} needs {entry.dim}")
        return self._search(entry.name, q, k, params, self._masks(filter))

    def _search(self, encoder: str, vector: np.ndarray, k: int, params: Any, masks) -> list[Hit]:
        config = SearchConfig.from_any(params)
        config = SearchConfig(nprobe=config.nprobe or self.search_defaults.nprobe,
                              ef_search=config.ef_search or self.search_defaults.ef_search,
                              k_factor=config.k_factor or self.search_defaults.k_factor)
        return self.shards.search(encoder, vector, k, config, masks)

    def _masks(self, filter: Any) -> list[np.ndarray] | None:
        """A filter as one boolean array per shard (cached per filter); ``None`` when there is none."""
        conditions = parse_filter(filter) if filter else []
        if not conditions:
            return None
        if self.count:      # a field no image has (a typo) is an error, not an empty answer
            check_fields(conditions, self.records.filter_fields | {colour.FILTER_FIELD})
        key = filter_key(conditions)
        with self._lock:
            if key in self._mask_cache:
                self._mask_cache.move_to_end(key)
                return self._mask_cache[key]
        masks = self.records.masks([c for c in conditions if c.field != colour.FILTER_FIELD], self.filter_views)
        for cond in (c for c in conditions if c.field == colour.FILTER_FIELD):
            masks = self._colour_masks(cond, masks)
        with self._lock:
            self._mask_cache[key] = masks
            while len(self._mask_cache) > MASK_CACHE_SIZE:
                self._mask_cache.popitem(last=False)
        return masks

    def set_filter_views(self, views: dict[str, Callable[[Any], Any]] | None) -> None:
        """Filters compare these metadata columns as ``views[column](value)`` shows them (e.g. a server that
        hides paths: the relative paths its results show), not as stored; cached filter masks are dropped."""
        with self._lock:
            self.filter_views = dict(views) if views else None
            self._mask_cache.clear()
            self.records.forget_views()

    def _colour_masks(self, cond, masks: list[np.ndarray]) -> list[np.ndarray]:
        """``{"colour-names": "red" | ["red", "pink"]}``: keep images showing one of the colours
        (:func:`retrieval.colour.naming.colour_filter_mask`, from the stored colour-names vectors)."""
        name = colour_encoder(self)
        if name is None:
            raise InvalidQueryError(f"filter {colour.FILTER_FIELD!r} needs an index with the colour-names encoder "
                                    "(loupe index ... --encoder colour-names)")
        values = cond.value if cond.op == "in" else (cond.value,)
        if cond.op not in ("eq", "in") or not all(isinstance(v, str) for v in values):
            raise InvalidQueryError(f"filter {colour.FILTER_FIELD!r} takes a colour or a list of colours, "
                                    'e.g. {"colour-names": "red"}')
        return [m & colour.colour_filter_mask(vecs, list(values)) if len(vecs) else m
                for m, (_, vecs, _) in zip(masks, self.all_vectors(name))]

    def dedup_hits(self, encoder: str, hits: list[Hit], threshold: float) -> list[Hit]:
        """Drop hits whose stored vector is within ``threshold`` cosine of a better-ranked kept hit."""
        if len(hits) < 2:
            return list(hits)
        vecs = self.vectors(encoder, hits)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        kept: list[int] = []
        for i in range(len(hits)):
            if not kept or float(np.max(vecs[kept] @ vecs[i])) < threshold:
                kept.append(i)
        return [hits[i] for i in kept]

    def _notes(self, ctx: QueryContext) -> list[str]:
        """A note when a query asks for a colour this index cannot see: no colour-names encoder and a text
        encoder that is not CLIP (the offline ConSE encoder cannot tell colours apart)."""
        if colour_encoder(self) is not None or ctx.encoder.startswith("clip"):
            return []
        if ctx.instruction is not None:
            asked = instruction_colour(ctx.instruction)
        else:
            asked = colour_words(ctx.text) if ctx.text else None
        if not asked:
            return []
        return [f"this index cannot see colours ({ctx.encoder} does not tell {asked!r} from other colours); "
                "re-index with --encoder colour-names to search by colour"]

    # -- life cycle --------------------------------------------------------------------------------
    def changed_on_disk(self) -> bool:
        """True when ``manifest.json`` was replaced since this engine opened it (a new indexing run, a commit):
        its inode, mtime or size differs (two commits within one mtime tick still differ by inode)."""
        return _stamp(self.index_dir / store.MANIFEST) != self.manifest_stamp

    def reopen(self) -> "Engine":
        """A fresh engine over the current state of the index, sharing the loaded encoders and the
        text-embedding cache (this engine stays valid for requests still using it). The new engine has
        opened every file of its version (``_open_version``) before it is returned: a server switches
        to it only then, and neither engine opens an index file by path afterwards."""
        new = Engine(self.index_dir, device=self.device, mmap=self._mmap, search_device=self.search_device)
        new.embedder.adopt(self.embedder)
        return new

    def close(self) -> None:
        self.shards.close()
        self.embedder.encoders.clear()


def _search_device(device: str) -> str | None:
    """Where exact searches run for an engine on ``device``: the GPU for ``cuda``/``cuda:N`` (and ``auto``
    when one is present), else ``None`` (faiss on the CPU)."""
    if device.startswith("cuda"):
        return device
    if device == "auto":
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            return None
    return None


def _request(request: SearchRequest | None, fields: dict[str, Any]) -> SearchRequest:
    if request is None:
        return SearchRequest(**fields)
    if fields:
        raise TypeError("pass a SearchRequest or its fields, not both")
    if not isinstance(request, SearchRequest):
        raise TypeError(f"expected a SearchRequest, got {type(request).__name__}")
    return request


def _open_regions(engine: Engine) -> dict:
    """The region index's sets (``retrieval.regions.store``), rows of images the index holds; {} without one."""
    if not (engine.manifest.extra or {}).get("regions"):
        return {}
    from retrieval.errors import UnknownIdError
    from retrieval.regions.store import open_region_sets

    def known(image_id: str) -> bool:
        try:
            engine.records.locate(image_id)
        except UnknownIdError:
            return False
        return True

    return open_region_sets(engine.index_dir, engine.manifest, known)


def _classifiers_of(engine: Engine):
    """The engine's classifier registry (the caption route of instruction queries names the query image)."""
    from retrieval.classify.registry import classifiers_of

    return classifiers_of(engine)


def _is_fusion(method: str) -> bool:
    if method == "auto":
        from retrieval.compose.compose import DEFAULT_METHOD

        method = DEFAULT_METHOD
    return method == "fusion"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced by renaming: (inode, mtime, size); None if it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size
