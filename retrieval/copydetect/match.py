"""Copy detection: "is this image a copy of something we have?", with one threshold for all queries.

Pipeline for a query image (``match_images``; the maths are pure functions in ``retrieval.copydetect.scores``):

0. **Query views**: the whole image plus the regions ``retrieval.copydetect.regions.query_regions``
   proposes (border trim, content boxes: a picture pasted into a screenshot or padded). Every view is
   scored as below; a candidate keeps its best score over the views (``score_views``, the DISC21
   winners' query-side multi-crop), and the match reports the view's box (``Match.region``).
1. **Candidates by global vector**: the top ``k`` indexed images by cosine (float encoders) or by
   Hamming distance (PDQ, packed 256-bit codes in a ``faiss.IndexBinaryFlat``; a Hamming distance
   ``h`` is the score ``1 - 2h/256``).
2. **Score normalisation against a background set** (the SSCD / DISC21 trick)::

       normalised(q, r) = sim(q, r) - beta * sim(q, b_k(q))

   where ``b_k(q)`` is the query's ``bg_k``-th nearest neighbour in a set of images unrelated to
   the collection. A query that is "close to everything" (plain textures, text, simple shapes) gets
   its scores lowered as much as it is close to arbitrary images, so one threshold works across
   queries. Background: ``DIR/<encoder>/background.npy`` (float32 unit rows, or uint8 codes for
   PDQ) written by :func:`build_background` / ``loupe match --build-background FOLDER``. Without
   that file, ``background_size`` vectors are sampled (seeded) from the index itself (all of it when
   smaller), and for each candidate the background neighbours that *are* that candidate or its twins
   (similarity >= ``twin_threshold`` to it) are skipped, so a true copy is never normalised away by
   its own original or another version of it.
3. **Local verification** (when the index stores local features and ``verify`` is on): the local
   descriptors of the query view that gave a candidate its score and the candidate's go through
   the re-ranker's spatial check (``retrieval.rerank.verify_pair``: mutual nearest neighbours +
   RANSAC affine), whose score in
   [0, 1] (inlier evidence) is added: ``final = normalised + w_verify * verify``.

Thresholds (``DEFAULT_THRESHOLDS``) were calibrated on ``benchmarks/bench_copydetect.py`` for about
90 % precision; see ``benchmarks/results/copydetect.md``. Metrics for such calibration are here too
(``retrieval.copydetect.metrics``, re-exported here: :func:`micro_average_precision` as DISC21 defines
µAP, :func:`recall_at_precision`, :func:`threshold_for_precision`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from retrieval.copydetect.scores import (
    PREFERRED_ENCODERS,
    Background,
    Match,
    MatchConfig,
    ScoredViews,
    _pad_columns,
    background_similarity,
    collect_matches,
    knn,
    score_views,
)
from retrieval.errors import InvalidQueryError
from retrieval.numeric import pack_signs

BACKGROUND_FILE = "background.npy"
BACKGROUND_IDS_FILE = "background-ids.npy"

# -- background sets ----------------------------------------------------------------------------
def background_path(index_dir, encoder: str) -> Path:
    return Path(index_dir) / encoder / BACKGROUND_FILE


def build_background(encoder, images: Iterable[Any], path: str | Path | None = None, *,
                     batch_size: int = 32, progress=None) -> np.ndarray:
    """Embed ``images`` (PIL / paths / bytes) of unrelated content with ``encoder`` and save them
    (float32 rows; PDQ: packed uint8 codes) to ``path`` (normally ``DIR/<encoder>/background.npy``).
    A few hundred to a few thousand images are enough."""
    from retrieval.index.store import atomic_write_with

    chunks, batch = [], []

    def flush():
        if batch:
            chunks.append(_embed_for_matching(encoder, batch))
            if progress:
                progress(len(batch))
            batch.clear()
    for img in images:
        batch.append(img)
        if len(batch) >= batch_size:
            flush()
    flush()
    if not chunks:
        raise InvalidQueryError("build_background needs at least one image")
    vectors = np.concatenate(chunks)
    if path is not None:
        atomic_write_with(path, lambda tmp: np.save(tmp, vectors))
    return vectors


def _embed_for_matching(encoder, images) -> np.ndarray:
    if getattr(encoder, "binary", False) and hasattr(encoder, "hash_bits"):
        return encoder.hash_bits(images)
    return encoder.encode_images(images)


# -- the Engine adapter -------------------------------------------------------------------------
def choose_encoder(engine, name: str | None = None) -> str:
    """The encoder to match with: ``name``, else the most copy-specific encoder of the index."""
    encoders = list(engine.manifest.encoders)
    if name:
        if name not in encoders:
            from retrieval.errors import UnknownEncoderError

            raise UnknownEncoderError(f"encoder {name!r} is not in this index (it has: {', '.join(encoders)})")
        return name
    for pref in PREFERRED_ENCODERS:
        if pref in encoders:
            return pref
    non_binary = [e for e in encoders if engine.manifest.encoders[e].index_type != "binary" and e != "pdq"
                  and "colour" not in engine.manifest.encoders[e].modalities]   # colour-names: colours only
    return (non_binary or encoders)[0]


def _is_binary_encoder(engine, name: str) -> bool:
    entry = engine.manifest.encoders[name]
    return entry.index_type == "binary" or name == "pdq"


def binary_blocks(engine, name: str):
    """``(shard, packed uint8 codes [n, nbits/8], ids)`` per shard of a binary (PDQ) encoder: read
    straight from the binary shards when the engine exposes them, else packed from ``all_vectors``."""
    indexes = getattr(engine, "indexes", {}).get(name)
    shard_ids = getattr(engine, "shard_ids", None)
    if indexes is not None and shard_ids is not None and all(hasattr(ix, "code_size") for ix in indexes):
        for i, ix in enumerate(indexes):
            codes = ix.reconstruct_n(0, ix.ntotal) if ix.ntotal else np.zeros((0, ix.code_size), np.uint8)
            yield i, np.asarray(codes, np.uint8), list(shard_ids[i])
        return
    for i, vecs, vids in engine.all_vectors(name):
        yield i, pack_signs(vecs), vids


def _all_codes(engine, name: str) -> tuple[np.ndarray, list[str]]:
    """Every packed code of a binary encoder and its id, in one array (kept per engine: ``Engine.cache``)."""

    def pack() -> tuple[np.ndarray, list[str]]:
        codes, ids = [], []
        for _, block, vids in binary_blocks(engine, name):
            codes.append(block)
            ids.extend(vids)
        return (np.concatenate(codes) if codes else np.zeros((0, 32), np.uint8), ids)

    return engine.cache(("copydetect.codes", name), pack)


def load_background(engine, name: str, config: MatchConfig) -> Background:
    """``DIR/<encoder>/background.npy`` if present, else a seeded sample of the index's vectors; kept per
    engine (``Engine.cache``) until the file changes (``loupe match --build-background`` while serving)."""
    path = background_path(engine.index_dir, name)
    mtime = path.stat().st_mtime if path.is_file() else None

    def load() -> Background:
        binary = _is_binary_encoder(engine, name)
        if mtime is not None:
            vecs = np.load(path)
            return Background(pack_signs(vecs) if binary else vecs.astype(np.float32), None, "file")
        blocks = binary_blocks(engine, name) if binary else engine.all_vectors(name)
        return sample_background(blocks, config.background_size, seed=config.seed, binary=binary)

    return engine.cache(("copydetect.background", name, mtime, config.background_size, config.seed), load)


def sample_background(blocks: Iterable[tuple[int, np.ndarray, list[str]]], size: int, *, seed: int = 0,
                      binary: bool = False) -> Background:
    """A seeded uniform sample of ``size`` rows (with their ids) over ``(shard, vectors, ids)`` blocks,
    holding at most ``size`` rows at a time (reservoir over blocks)."""
    rng = np.random.default_rng(seed)
    keep_v: np.ndarray | None = None
    keep_ids: list[str] = []
    keys = np.zeros(0)
    for _, vecs, ids in blocks:
        vecs = pack_signs(vecs) if binary else np.asarray(vecs, np.float32)
        k = rng.random(len(vecs))
        if keep_v is None:
            keep_v = vecs[:0]
        allv = np.concatenate([keep_v, vecs])
        allk = np.concatenate([keys, k])
        alli = keep_ids + list(ids)
        top = np.argsort(allk)[:size]
        keep_v, keys, keep_ids = allv[top], allk[top], [alli[i] for i in top]
    if keep_v is None or len(keep_v) == 0:
        raise InvalidQueryError("the index is empty: no background can be sampled")
    return Background(keep_v, np.asarray(keep_ids, dtype=object), "index-sample")


def _verify_available(engine, name: str) -> bool:
    entry = engine.manifest.encoders[name]
    return bool(entry.local_features)


def local_encoder(engine, name: str) -> str | None:
    """The encoder whose stored local features verify ``name``'s candidates: ``name`` itself if it has
    them, else the first encoder of the index that has (every encoder of an index holds the same
    images in the same shards and rows, so e.g. sscd candidates are verified with effnet-lite0's
    feature map)."""
    if _verify_available(engine, name):
        return name
    return next((n for n in engine.manifest.encoders if _verify_available(engine, n)), None)


def verification_enabled(engine, name: str, config: MatchConfig) -> bool:
    """Whether ``match_images`` verifies locally: asked for (or auto) and the index has local features."""
    if config.verify is False:
        return False
    return local_encoder(engine, name) is not None


@dataclass
class QueryViews:
    """The views of a batch of query images: vectors ``[views, d]``, the query of each view, its box in
    the query image (None = the whole image) and its PIL crop (for local verification)."""

    vectors: np.ndarray
    owner: np.ndarray
    boxes: list[Any]
    images: list[Any]


def embed_query_views(engine, name: str, images: Sequence[Any], config: MatchConfig) -> QueryViews:
    """Embed every query image whole, plus (``config.regions``) the regions :func:`query_regions`
    proposes (content boxes, trimmed borders), all crops in one encoder batch."""
    from retrieval.copydetect.regions import RegionConfig, query_regions

    ctxs = [engine.embed(image=img, encoder=name) for img in images]
    vectors = [np.asarray(c.vector, np.float32) for c in ctxs]
    owner, boxes, crops = list(range(len(ctxs))), [None] * len(ctxs), [c.image for c in ctxs]
    extra_owner, extra_boxes, extra_crops = [], [], []
    if config.regions and config.max_regions > 1:
        rcfg = RegionConfig(max_regions=config.max_regions)
        for qi, ctx in enumerate(ctxs):
            if ctx.image is None:
                continue
            for box in query_regions(ctx.image, rcfg)[1:]:
                extra_owner.append(qi)
                extra_boxes.append(box)
                extra_crops.append(ctx.image.crop(box))
    if extra_crops:
        enc = engine.encoder(name)
        vecs = np.asarray(enc.encode_images(extra_crops), np.float32)
        vecs = vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        vectors.extend(vecs)
    # views of one query contiguous, its whole image first
    order = sorted(range(len(owner) + len(extra_owner)), key=lambda i: ((owner + extra_owner)[i], i))
    all_owner, all_boxes, all_crops = owner + extra_owner, boxes + extra_boxes, crops + extra_crops
    return QueryViews(np.stack([vectors[i] for i in order]), np.asarray([all_owner[i] for i in order], np.int64),
                      [all_boxes[i] for i in order], [all_crops[i] for i in order])


def match_images(engine, images: Sequence[Any], config: MatchConfig | None = None, *,
                 encoder: str | None = None) -> list[list[Match]]:
    """For each query image (bytes / PIL / path), the indexed images it is a copy of, best first.

    Uses ``engine`` (``retrieval.engine.Engine``) to embed and search; see the module docstring for
    the scoring."""
    config = config or MatchConfig()
    name = choose_encoder(engine, encoder)
    binary = _is_binary_encoder(engine, name)
    if not images:
        return []
    qv = embed_query_views(engine, name, images, config)
    n_queries = len(images)
    # 1. candidates of every view; candidate keys index one id list shared by the request
    keys: dict[str, int] = {}
    key_ids: list[str] = []
    view_ids: list[list[str]] = []
    if binary:
        codes, ids = _all_codes(engine, name)
        qb = pack_signs(qv.vectors)
        sims, rows = knn(qb, codes, config.k)
        view_ids = [[ids[r] for r in row if r >= 0] for row in rows]
        cand_vecs = [codes[row[row >= 0]] for row in rows]
    else:
        qb = qv.vectors
        sims = np.full((len(qb), config.k), -np.inf, np.float32)
        cand_vecs = []
        for vi, vec in enumerate(qb):
            hits = engine.search_vector(name, vec, config.k)
            view_ids.append([h.id for h in hits])
            sims[vi, :len(hits)] = [h.score for h in hits[:config.k]]
            cand_vecs.append(engine.vectors(name, hits[:config.k]) if config.normalize and
                             config.skip_twins else None)
    krows = np.full(sims.shape, -1, np.int64)
    for vi, vids in enumerate(view_ids):
        for ci, cid in enumerate(vids[:config.k]):
            if cid not in keys:
                keys[cid] = len(key_ids)
                key_ids.append(cid)
            krows[vi, ci] = keys[cid]
    # 2. background
    bg = None
    if config.normalize:
        background = load_background(engine, name, config)
        twin_ok = all(v is not None for v in cand_vecs)
        bg = background_similarity(qb, background, config.bg_k, view_ids,
                                   candidate_vectors=cand_vecs if twin_ok else None,
                                   twin_threshold=config.resolved_twin_threshold(name))
        bg = _pad_columns(bg, sims.shape[1])
    scored = score_views(sims, krows, qv.owner, n_queries, config, bg)
    # 3. local verification, with the view that gave each candidate its score
    ver = None
    if verification_enabled(engine, name, config):
        ver = _verify_candidates(engine, local_encoder(engine, name), qv, scored, key_ids, config)
    threshold = config.resolved_threshold(ver is not None, name)
    found = collect_matches(scored, [key_ids] * n_queries, config, ver, threshold, qv.boxes)
    if config.pixel_check and config.threshold is None and config.n_check > 0:
        _confirm_by_pixels(engine, name, qv, scored, key_ids, found, config, ver)
    return found


def _confirm_by_pixels(engine, name: str, qv: QueryViews, scored: ScoredViews, key_ids, found, config: MatchConfig,
                       ver) -> None:
    """The same copy check as ``loupe dedup`` (``retrieval.copydetect.collection``): each query's top
    ``n_check`` candidates whose raw similarity reaches the encoder's candidate threshold and that
    scored under the decision threshold are compared with the query from pixels (PDQ, aligned
    thumbnails; SSCD when indexed); a confirmed copy is added to the query's matches (``check`` says
    which test found it). A resized and re-encoded copy scores like a look-alike in a general-purpose
    encoder's space; its pixels tell them apart."""
    from retrieval.copydetect.check import PixelCache
    from retrieval.copydetect.collection import CopyCheckConfig, PairChecker

    cfg = CopyCheckConfig()
    cand_thr = cfg.candidate(name)
    first_view = {int(o): v for v, o in reversed(list(enumerate(qv.owner.tolist())))}
    queries = {f"\0query{qi}": qv.images[v] for qi, v in first_view.items()}

    def load(image_id: str):
        return queries[image_id] if image_id in queries else engine.load_image(image_id)

    checker = PairChecker(engine, name, cfg, load=load)
    checker.pixels = PixelCache(load, size=256, pdq=checker.stored_pdq is None)
    for qi, matches in enumerate(found):
        img = queries.get(f"\0query{qi}")
        if img is None:
            continue
        have = {m.id for m in matches}
        final = scored.scores[qi] + (0 if ver is None else np.float32(config.w_verify) * np.nan_to_num(ver[qi]))
        for ci in range(min(config.n_check, scored.rows.shape[1])):
            r = int(scored.rows[qi, ci])
            if r < 0 or key_ids[r] in have or not scored.sims[qi, ci] >= cand_thr:
                continue
            how = _pixel_decision(checker, f"\0query{qi}", key_ids[r])
            if how is None:
                continue
            v = int(scored.views[qi, ci])
            box = qv.boxes[v]
            matches.append(Match(
                query=qi, id=key_ids[r], score=float(final[ci]), similarity=float(scored.sims[qi, ci]),
                background=None if scored.background is None else float(scored.background[qi, ci]),
                verify=None if ver is None or np.isnan(ver[qi, ci]) else float(ver[qi, ci]),
                region=None if box is None else tuple(int(x) for x in box), check=how))
        matches.sort(key=lambda m: -m.score)


def _pixel_decision(checker, query_key: str, image_id: str) -> str | None:
    """pdq / aligned / sscd when the pixels (or SSCD) say copy; the query has no stored vectors, so its
    PDQ bits come from its pixels and SSCD is not consulted for it."""
    from retrieval.copydetect.check import pdq_similarity

    pq, pc = checker.pixels.get(query_key), checker.pixels.get(image_id)
    if pq is None or pc is None:
        return None
    hq = pq[1]
    hc = checker._pdq(image_id, pc) if checker.stored_pdq is not None else pc[1]
    if checker.stored_pdq is not None:      # hash the query as the index hashed its images
        try:
            hq = np.asarray(checker.engine.encoder("pdq").hash_bool([checker.pixels.load(query_key)])[0], bool)
        except Exception:  # noqa: BLE001 - the pdq extra missing here: no PDQ evidence for the query
            hq = None
    if hq is not None and hc is not None and pdq_similarity(hq, hc) >= checker.config.pdq_threshold:
        return "pdq"
    from retrieval.copydetect.check import aligned_correlation

    if aligned_correlation(pq[0], pc[0]) >= checker.align_threshold(pq[0], pc[0]):
        return "aligned"
    return None


def _verify_candidates(engine, vname, qv: QueryViews, scored: ScoredViews, key_ids, config: MatchConfig
                       ) -> np.ndarray | None:
    """Local verification scores [q, k] (NaN where not verified) with ``vname``'s local features."""
    try:
        from retrieval.engine.query import QueryContext
        from retrieval.rerank.config import DEFAULT_CONFIG
        from retrieval.rerank.query import query_local_features
        from retrieval.rerank.verify import verify_pair
    except ImportError:
        return None
    info = engine.manifest.encoders[vname].local_features or {}
    ver = np.full(scored.rows.shape, np.nan, np.float32)
    rcfg = replace(DEFAULT_CONFIG, allow_reflection=True)   # flips are a common copy edit
    view_local: dict[int, Any] = {}
    for qi, ci in zip(*np.nonzero(scored.rows[:, :config.n_verify] >= 0)):
        v = int(scored.views[qi, ci])
        if v not in view_local:
            img = qv.images[v]
            ctx = QueryContext(vector=qv.vectors[v], encoder=vname, image=img)
            view_local[v] = None if img is None else query_local_features(engine, ctx, vname)
        q = view_local[v]
        if q is None:
            continue
        q_desc, q_pos, q_grid = q
        hit = engine.hit_for_id(vname, key_ids[int(scored.rows[qi, ci])])
        c_desc, c_pos = engine.local_features(vname, [hit])[0]
        c_grid = tuple(info.get("grid") or (int(np.max(c_pos[:, 0])) + 1, int(np.max(c_pos[:, 1])) + 1))
        ver[qi, ci] = verify_pair(q_desc, q_pos, np.asarray(c_desc, np.float32), c_pos, q_grid, c_grid, rcfg).score
    return ver


__all__ = ["QueryViews", "embed_query_views", "build_background", "background_path", "load_background",
           "sample_background", "choose_encoder", "match_images", "verification_enabled", "binary_blocks",
           "local_encoder"]
