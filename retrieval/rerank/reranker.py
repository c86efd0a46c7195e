"""Local-global re-ranking: local matching, spatial verification (RANSAC), αQE / DBA, score fusion.

Everything but ``rerank_hits`` is a pure function over arrays; ``rerank_hits`` is the thin adapter
the Engine calls (``Engine.search(rerank=True)``). The pieces live in their own modules (all names are
re-exported here):

- ``retrieval.rerank.config``: ``RerankConfig`` and the defaults (``DEFAULT_CONFIG``, ``FINE_DEFAULT_CONFIG``);
- ``retrieval.rerank.verify``: local matching (step 1) and spatial verification (step 2): ``verify_pair``,
  ``ransac_affine``, the batched similarities and match counts;
- ``retrieval.rerank.regions``: multi-region query descriptors and the query-crop windows (step 3);
- ``retrieval.rerank.query``: the query's local descriptors and the index's PCA reducer, from an engine;
- here: fusion, αQE / DBA, ``rerank_arrays`` (one query against its candidates) and ``rerank_hits``.

Pipeline for an image query against the top ``N`` (default 100) global candidates:

1. **Local matching.** Query and candidate local descriptors (unit rows, the index's PCA-reduced
   patch tokens / feature-map cells) give a similarity matrix ``S = Q Cᵀ``. Two scores:
   *MaxSim / Chamfer* ``mean_i max_j S_ij`` (query → candidate: every query patch finds its best
   counterpart; robust to the candidate holding more than the query), and the set of *mutual nearest
   neighbours* (``j = argmax_j S_ij`` and ``i = argmax_i S_ij``, ``S_ij ≥ min_match_sim``).
2. **Spatial verification.** The mutual-NN matches' grid centres (normalised to [0, 1]) are fitted
   with a 2-D affine transform by RANSAC (minimal samples of 3; all triples when there are at most
   ``ransac_iters`` of them, else ``ransac_iters`` seeded random triples; hypotheses evaluated as one
   batched numpy computation; implausible transforms — scale outside ``[1/max_scale, max_scale]``,
   anisotropy above ``max_aspect``, reflections — are rejected; the best one is refitted on its
   inliers by least squares). The inlier count is the evidence: it survives crops (scale), rotations,
   and partial copies (only the shared part matches).
3. **Multi-region query descriptors** (``config.regions``): square windows of the query's token grid
   (``region_sizes`` cells, ``region_stride``) are mean-pooled like the encoder's own global pooling and
   L2-normalised; a candidate's ``region`` score is its best cosine over these regional vectors
   (max-pooled). A query whose object sits in clutter (an object pasted onto another picture, a
   small crop's context) matches the object's own image through the region that holds it. With a
   ``search`` function and ``region_expand = m``, each region also fetches its own global top-``m``;
   the union is cut back to ``n_candidates`` by ``global + w_region * region`` before local matching.
   **Query-crop second pass** (``config.crop``): the ``crop_count`` best windows (``crop_select``:
   ``gain`` = the window whose vector beats the global vector by most on some candidate, ``match`` = the
   best region–candidate cosine, ``novel`` = the window least like the global vector) are mapped from
   grid cells to a pixel box of the query image (``grid_box_to_pixels``, the encoder's own centre crop
   undone, ``crop_margin`` cells added), cropped and embedded again with the encoder's ``encode_images``
   (one batched forward pass). A candidate's ``crop`` score is its best cosine to these crop vectors; with
   ``search`` and ``crop_expand = m`` each crop vector fetches its own top-``m`` too (an object pasted on
   another picture covers a few cells whose pooled features mostly describe the surroundings; re-embedding
   the enlarged crop describes the object itself).
4. **Fusion** (documented, defaults tuned on ``benchmarks/bench_rerank.py``)::

       fused = global + w_region * max(region, crop) + w_local * maxsim
               + w_spatial * min(inliers, inlier_cap) / inlier_cap

   (``crop_fuse="sum"`` adds ``w_crop * crop`` instead of taking the max; without the crop pass the
   region term is ``region`` alone)

   where ``inliers`` counts only when ``inliers >= max(min_inliers, min_inlier_ratio * matches)``
   (fewer is what chance gives: random matches on a coarse grid fit some affine map by accident).
   All similarities are one batched product; RANSAC runs only for candidates with at least
   ``min_inliers`` matches (the others cannot score), optionally only for the best ``spatial_top``.
5. **αQE** (optional): the query vector is expanded with the top ``qe_k`` re-ranked candidates,
   ``q' = norm(q + Σ_i max(q·v_i, 0)^α v_i)``, and the global term is recomputed with ``q'``.
   **DBA** (optional): candidate vectors are replaced by ``norm(Σ_j (v_i·v_j)^α v_j)`` over their
   ``dba_k`` nearest neighbours within the shortlist before scoring.

For a text query, the encoder's local features must live in the joint text–image space (CLIP's
projected patch tokens): each candidate gets ``mean of the top 1/8 patch similarities`` to the text
vector (projected through the index's PCA), fused as ``global + w_text * patch_score``. Encoders whose
local features are not in the text space (ConSE's CNN cells) keep the global order.

``verify_pair`` (``retrieval.rerank.verify``) is the standalone spatial check (used by copy detection).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from retrieval.numeric import l2_normalize
from retrieval.rerank.config import DEFAULT_CONFIG, FINE_DEFAULT_CONFIG, RerankConfig
from retrieval.rerank.query import (
    local_info,
    project_text,
    query_local_features,
    query_tokens,
    text_in_patch_space,
)
from retrieval.rerank.regions import (
    crop_windows,
    encoder_view,
    grid_box_to_pixels,
    region_scores,
    region_vectors,
    region_windows,
)
from retrieval.rerank.verify import (
    VerificationResult,
    batched_match_counts,
    batched_similarity,
    verify_pair,
)

__all__ = ["LocalScores", "alpha_query_expansion", "database_side_augmentation", "fuse_scores",
           "text_patch_scores", "rerank_arrays", "rerank_hits"]


@dataclass
class LocalScores:
    """Per-candidate evidence and the fused score, in candidate order."""

    global_scores: np.ndarray
    maxsim: np.ndarray
    inliers: np.ndarray
    spatial: np.ndarray
    fused: np.ndarray
    verifications: list[VerificationResult | None]


# -- query expansion / DBA ---------------------------------------------------------------------
def alpha_query_expansion(query: np.ndarray, neighbours: np.ndarray, alpha: float = 3.0) -> np.ndarray:
    """αQE (Radenović et al.): ``norm(q + Σ_i max(q·v_i, 0)^α v_i)`` over the given neighbour vectors."""
    q = np.asarray(query, np.float32).reshape(-1)
    v = np.asarray(neighbours, np.float32).reshape(-1, q.shape[0])
    w = np.maximum(v @ q, 0.0) ** alpha
    return l2_normalize((q + w @ v)[None])[0]


def database_side_augmentation(vectors: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """DBA: each vector becomes ``norm(Σ_{j ∈ kNN(i) ∪ {i}} max(v_i·v_j, 0)^α v_j)`` within ``vectors``."""
    v = np.asarray(vectors, np.float32)
    if len(v) == 0 or k <= 0:
        return v.copy()
    sim = v @ v.T
    k = min(k + 1, len(v))                        # the vector itself is its own nearest neighbour
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    w = np.maximum(np.take_along_axis(sim, nn, axis=1), 0.0) ** alpha
    return l2_normalize(np.einsum("nk,nkd->nd", w, v[nn]))


# -- fusion ------------------------------------------------------------------------------------
def fuse_scores(global_scores: np.ndarray, maxsim: np.ndarray, spatial: np.ndarray,
                config: RerankConfig = DEFAULT_CONFIG, region_scores: np.ndarray | None = None,
                crop_scores: np.ndarray | None = None) -> np.ndarray:
    """``global + w_region·region + w_crop·crop + w_local·maxsim + w_spatial·spatial`` (terms switched off
    by the config, or not given, count 0)."""
    out = np.asarray(global_scores, np.float64).copy()
    crop = config.crop and crop_scores is not None
    if config.regions and region_scores is not None:
        rs = np.asarray(region_scores, np.float64)
        if crop and config.crop_fuse == "max":
            rs, crop = np.maximum(rs, np.asarray(crop_scores, np.float64)), False
        out += config.w_region * rs
    if crop:
        out += config.w_crop * np.asarray(crop_scores, np.float64)
    if config.local:
        out += config.w_local * np.asarray(maxsim, np.float64)
    if config.spatial:
        out += config.w_spatial * np.asarray(spatial, np.float64)
    return out


def text_patch_scores(text_vec: np.ndarray, candidates: Sequence[np.ndarray], top_frac: float = 0.125) -> np.ndarray:
    """Per candidate: the mean of its top ``top_frac`` patch similarities to the text vector."""
    t = np.asarray(text_vec, np.float32).reshape(-1)
    out = np.zeros(len(candidates), np.float64)
    for n, desc in enumerate(candidates):
        if len(desc) == 0:
            continue
        s = np.sort(np.asarray(desc, np.float32) @ t)[::-1]
        top = max(1, int(round(len(s) * top_frac)))
        out[n] = float(s[:top].mean())
    return out


def rerank_arrays(q_desc: np.ndarray, q_pos: np.ndarray, q_grid: Sequence[int], global_scores: np.ndarray,
                  candidates: Sequence[tuple[np.ndarray, np.ndarray]], c_grid: Sequence[int] | None = None,
                  config: RerankConfig = DEFAULT_CONFIG, region_scores: np.ndarray | None = None,
                  crop_scores: np.ndarray | None = None) -> LocalScores:
    """Local + spatial evidence and fused scores for one image query against its candidates.

    With ``config.local_norm_pct`` set (default 80), each query token's best similarity to a
    candidate is measured against that token's ``local_norm_pct``-th percentile over the whole
    shortlist (its *background*): tokens that match every candidate equally well (a white
    background, sky, texture) stop counting, and only tokens above their background take part in
    the matching that spatial verification sees. ``maxsim`` is then ``mean_i max(M_ci - b_i, 0)``.

    All similarities come from one matrix product; RANSAC runs only for candidates with at least
    ``min_inliers`` matches (fewer cannot pass the inlier test, so the scores are unchanged), and with
    ``config.spatial_top`` set, only for that many candidates ranked first by the fused score without
    the spatial term.
    """
    n = len(candidates)
    maxsim = np.zeros(n)
    inliers = np.zeros(n, np.int64)
    spatial = np.zeros(n)
    verifications: list[VerificationResult | None] = [None] * n
    q_desc = np.asarray(q_desc, np.float32)
    g = np.asarray(global_scores, np.float64)
    if n == 0 or len(q_desc) == 0:
        fused = fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores)
        return LocalScores(g, maxsim, inliers, spatial, fused, verifications)
    sims, valid = batched_similarity(q_desc, candidates)
    has = valid.any(axis=1)
    best = np.full((n, len(q_desc)), np.nan)
    if has.any():
        best[has] = sims[has].max(axis=2)
    normalise = config.local_norm_pct is not None and int(has.sum()) >= 2
    if normalise:
        base = (np.percentile(best, config.local_norm_pct, axis=0) if has.all()
                else np.nanpercentile(best, config.local_norm_pct, axis=0))
        margin = best - base[None, :]                                 # [n, P] (nan for empty candidates)
        maxsim[has] = np.maximum(margin[has], 0.0).mean(axis=1)
        sims = np.where((margin > 0)[:, :, None], sims, np.float32(-np.inf))
    else:
        maxsim[has] = best[has].mean(axis=1)
    if config.spatial:
        counts = batched_match_counts(sims, config)
        todo = np.flatnonzero(has & (counts >= max(3, config.min_inliers)))
        if config.spatial_top is not None and len(todo) > config.spatial_top:
            pre = fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores)
            todo = todo[np.argsort(-pre[todo], kind="stable")[:config.spatial_top]]
        for idx in todo:
            c_desc, c_pos = candidates[idx]
            p = len(c_desc)
            res = verify_pair(q_desc, q_pos, c_desc, c_pos, q_grid, c_grid, config, sim=sims[idx, :, :p])
            verifications[idx] = res
            inliers[idx] = res.inliers
            spatial[idx] = res.score
    return LocalScores(g, maxsim, inliers, spatial, fuse_scores(g, maxsim, spatial, config, region_scores, crop_scores),
                       verifications)


def _expanded_scores(query: np.ndarray, vectors: np.ndarray, order: np.ndarray, config: RerankConfig) -> np.ndarray:
    """Global scores recomputed with αQE (top ``qe_k`` of ``order``) and/or DBA over ``vectors``."""
    v = database_side_augmentation(vectors, config.dba_k, config.dba_alpha) if config.dba else vectors
    q = np.asarray(query, np.float32)
    if config.qe and config.qe_k > 0:
        q = alpha_query_expansion(q, v[order[:config.qe_k]], config.qe_alpha)
    return v @ q


# -- Engine adapter ----------------------------------------------------------------------------
def _new_candidates(search: Callable[[np.ndarray, int], list], vectors: np.ndarray, n: int, hits: list) -> list:
    """Hits the ``search`` of each vector (top ``n``) finds that are not in ``hits`` yet, in order, once."""
    seen = {h.id for h in hits}
    new = []
    for v in vectors:
        for h in search(v, n):
            if h.id not in seen:
                seen.add(h.id)
                new.append(h)
    return new


def _expand_with_regions(engine, ctx, name: str, hits: list, regions: np.ndarray, g: np.ndarray,
                         search: Callable[[np.ndarray, int], list] | None, config: RerankConfig
                         ) -> tuple[list, np.ndarray, np.ndarray]:
    """Region scores for ``hits``; with ``search`` and ``config.region_expand``, each region's own top
    candidates join first. The shortlist is then cut to ``n_candidates`` by ``global + w_region·region``.
    Returns ``(hits, global scores, region scores)``."""
    hits = list(hits)
    if search is not None and config.regions and config.region_expand > 0:
        new = _new_candidates(search, regions, config.region_expand, hits)
        if new:
            vecs_new = np.asarray(engine.vectors(name, new), np.float32)
            g = np.concatenate([g, (vecs_new @ np.asarray(ctx.vector, np.float32)).astype(np.float64)])
            hits += new
    vecs = np.asarray(engine.vectors(name, hits), np.float32)
    rs = region_scores(regions, vecs)
    if len(hits) > config.n_candidates:
        w = config.w_region if config.regions else 0.0
        keep = np.sort(np.argsort(-(g + w * rs), kind="stable")[:config.n_candidates])
        hits, g, rs = [hits[i] for i in keep], g[keep], rs[keep]
    return hits, g, rs


CropEncoder = Callable[[Any, list], np.ndarray]


def _crop_pass(engine, ctx, name: str, hits: list, g: np.ndarray, rs: np.ndarray, windows: np.ndarray,
               regions: np.ndarray, grid: Sequence[int], search: Callable[[np.ndarray, int], list] | None,
               config: RerankConfig, crop_encoder: CropEncoder | None
               ) -> tuple[list, np.ndarray, np.ndarray, np.ndarray | None]:
    """The query-crop second pass: choose windows (``crop_windows``), crop them from the query image,
    embed the crops (one batch), score ``hits`` by their best crop cosine; with ``search`` and
    ``config.crop_expand`` the crops' own top candidates join, and the shortlist is cut back to
    ``n_candidates`` by ``global + w_region·region + w_crop·crop``. Returns ``(hits, g, rs, crop scores)``
    (crop scores None without a query image)."""
    image = ctx.get_image() if hasattr(ctx, "get_image") else getattr(ctx, "image", None)
    if image is None:
        return hits, g, rs, None
    vecs = np.asarray(engine.vectors(name, hits), np.float32)
    chosen = crop_windows(windows, regions, vecs, g, ctx.vector, config.crop_count, config.crop_select)
    if len(chosen) == 0:
        return hits, g, rs, None
    enc = engine.encoder(name)
    view = encoder_view(enc.spec, image.size)
    boxes = [grid_box_to_pixels(windows[i], grid, image.size, view, config.crop_margin) for i in chosen]
    if crop_encoder is not None:
        cv = crop_encoder(image, boxes)
    else:
        cv = enc.encode_images([image.crop(b) for b in boxes])
    cv = l2_normalize(np.asarray(cv, np.float32).reshape(len(boxes), -1))
    hits = list(hits)
    if search is not None and config.crop_expand > 0:
        new = _new_candidates(search, cv, config.crop_expand, hits)
        if new:
            vecs_new = np.asarray(engine.vectors(name, new), np.float32)
            g = np.concatenate([g, (vecs_new @ np.asarray(ctx.vector, np.float32)).astype(np.float64)])
            rs = np.concatenate([rs, region_scores(regions, vecs_new)])
            vecs = np.concatenate([vecs, vecs_new])
            hits += new
    cs = region_scores(cv, vecs)
    if len(hits) > config.n_candidates:
        pre = fuse_scores(g, np.zeros(len(g)), np.zeros(len(g)), replace(config, local=False, spatial=False),
                          rs if config.regions else None, cs)
        keep = np.sort(np.argsort(-pre, kind="stable")[:config.n_candidates])
        hits, g, rs, cs = [hits[i] for i in keep], g[keep], rs[keep], cs[keep]
    return hits, g, rs, cs


def _has_tokens(engine, name: str) -> bool | None:
    """Whether encoder ``name`` can give a query's local tokens (a spatial feature map); None when the
    engine cannot say (it does not load encoders)."""
    get = getattr(engine, "encoder", None)
    if get is None:
        return None
    try:
        enc = get(name)
    except Exception:  # noqa: BLE001 - an encoder that cannot be loaded: unknown, the caller goes on
        return None
    flag = getattr(enc, "has_local_features", None)
    if flag is None:                # an encoder that does not say: unknown
        return None
    return bool(flag) and callable(getattr(enc, "encode_images_and_local", None))


def local_encoder_for(engine, name: str, *, tokens_ok: bool | None = True, needed: bool = True) -> str | None:
    """The encoder whose stored local features re-rank ``name``'s candidates: ``name`` itself when it
    has them, else the first encoder of the index that has (every encoder of an index holds the same
    images in the same shards and rows). None when none has and ``name`` can still re-rank by its own
    query regions; raises ``InvalidQueryError`` (a 400, one CLI line) when re-ranking ``needed`` and
    nothing can re-rank: naming the encoder to use or how to index local features."""
    if local_info(engine, name):
        return name
    others = [n for n in engine.manifest.encoders if n != name and local_info(engine, n)]
    if others:
        return others[0]
    if tokens_ok is not False or not needed:
        return None
    from retrieval.errors import InvalidQueryError

    raise InvalidQueryError(
        f"cannot re-rank with encoder {name!r}: it has no spatial feature map and no encoder of this index "
        "stores local features; re-index with `loupe index ... --local-features` and an encoder that has "
        "them (effnet-lite0, dinov2-*, clip-*), or search without --rerank")


def rerank_hits(engine, ctx, hits: list, k: int, config: RerankConfig | dict | None = None, *,
                search: Callable[[np.ndarray, int], list] | None = None,
                crop_encoder: CropEncoder | None = None) -> list:
    """Re-rank ``hits`` (top-N global candidates of ``ctx``) with local evidence; return the top ``k``.

    ``config``: a :class:`RerankConfig`, or None / a dict of overrides of the defaults, which are
    ``DEFAULT_CONFIG`` or, for an index built with ``--local-layer fine``, ``FINE_DEFAULT_CONFIG``.
    Returned hits are copies with ``score`` set to the fused score. Without local features in the
    index (``loupe index --local-features``), the global order is kept (αQE/DBA and multi-region
    scores still apply if set). ``search(vector, n) -> hits`` (the engine's search with the request's
    filter and parameters) lets the query's regions fetch candidates of their own
    (``config.region_expand``); without it, regions only re-score the given hits.
    ``crop_encoder(image, boxes) -> vectors`` replaces the encoder's ``encode_images`` on the crops of the
    query-crop pass (``config.crop``; e.g. a cache); the crops' vectors must be in the index's space.
    """
    if config is None or isinstance(config, dict):
        own = local_info(engine, ctx.encoder) or next(
            (local_info(engine, n) for n in engine.manifest.encoders if local_info(engine, n)), None)
        fine = (own or {}).get("layer") == "fine"
        base = FINE_DEFAULT_CONFIG if fine else DEFAULT_CONFIG
        config = replace(base, **config) if isinstance(config, dict) else base
    hits = list(hits)[: max(config.n_candidates, int(k))]
    if not hits:
        return []
    name = ctx.encoder
    g = np.array([h.score for h in hits], np.float64)
    is_image = getattr(ctx, "image", None) is not None or bool(getattr(ctx, "image_id", None))
    tokens_ok = _has_tokens(engine, name)
    local_name = local_encoder_for(engine, name, tokens_ok=tokens_ok, needed=is_image)
    has_local = local_name is not None
    rs = cs = None
    regions_ok = tokens_ok is not False and not getattr(ctx, "instruction", None)
    if regions_ok and is_image and (config.regions or config.crop):
        q_tok = query_tokens(engine, ctx, name)
        if q_tok is not None:
            windows = region_windows(q_tok[1], config.region_sizes, config.region_stride)
            regions = region_vectors(q_tok[0], q_tok[1], windows)
            hits, g, rs = _expand_with_regions(engine, ctx, name, hits, regions, g, search, config)
            if config.crop:
                hits, g, rs, cs = _crop_pass(engine, ctx, name, hits, g, rs, windows, regions, q_tok[1], search,
                                             config, crop_encoder)
            if not config.regions:
                rs = None
    fused = fuse_scores(g, np.zeros(len(g)), np.zeros(len(g)), replace(config, local=False, spatial=False), rs, cs)
    if has_local:
        if is_image and (config.local or config.spatial):
            q = query_local_features(engine, ctx, local_name)
            if q is not None:
                cands = engine.local_features(local_name, hits)
                info = local_info(engine, local_name) or {}
                c_grid = tuple(info.get("grid") or q[2])
                fused = rerank_arrays(q[0], q[1], q[2], g, cands, c_grid, config, rs, cs).fused
        elif not is_image and local_name == name and getattr(ctx, "text", None) and text_in_patch_space(engine, name):
            t = project_text(engine, name, ctx.vector)
            cands = engine.local_features(name, hits)
            fused = g + config.w_text * text_patch_scores(t, [d for d, _ in cands], config.text_top_frac)
    if config.qe or config.dba:
        order = np.argsort(-fused, kind="stable")
        vecs = np.asarray(engine.vectors(name, hits), np.float32)
        new_g = _expanded_scores(ctx.vector, vecs, order, config)
        fused = fused - g + new_g
    order = np.argsort(-fused, kind="stable")[:k]
    return [replace(hits[i], score=float(fused[i])) for i in order]
