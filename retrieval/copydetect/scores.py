"""Copy detection, the array half: scoring config, matches, k-NN over float or binary vectors, score
normalisation against a background set, multi-view (query region) merging and match collection —
pure functions over arrays, used by ``retrieval.copydetect`` (which explains the pipeline) and
testable without an index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from retrieval.errors import InvalidQueryError
from retrieval.numeric import hamming_distance, hamming_to_score, pack_signs

# Calibrated on benchmarks/bench_copydetect.py (see benchmarks/results/copydetect.md) for about 90 %
# precision, with the default index-sample background and query regions; keys are (normalised?,
# verified?). Raw scores are similarities (best over the query's views); normalised ones are similarity
# margins over the background neighbour. Verified scores use effnet-lite0 local features (PCA-128,
# 7x7) + RANSAC, weight 0.25. Values from the 10,000-distractor run (database of 10,501 images, so the
# index sample is the whole collection), rounded down; with an index-sample background they move with
# what the collection holds — a background file is steadier.
DEFAULT_THRESHOLDS: dict[str, dict[tuple[bool, bool], float]] = {
    "effnet-lite0": {(False, False): 0.93, (True, False): 0.09, (True, True): 0.27, (False, True): 1.18},
    "sscd": {(False, False): 0.77, (True, False): 0.07, (True, True): 0.20, (False, True): 0.98},
    "pdq": {(False, False): 0.61, (True, False): 0.32, (True, True): 0.22, (False, True): 0.84},
    "*": {(False, False): 0.90, (True, False): 0.10, (True, True): 0.30, (False, True): 1.20},
}


# Similarity at which a background row counts as a copy of the candidate being normalised (and is
# skipped): SSCD's copy scale, PDQ's dedup threshold (Hamming <= 12 of 256); general-purpose
# encoders score unrelated images higher, so their twins must be closer.
DEFAULT_TWIN_THRESHOLDS: dict[str, float] = {"sscd": 0.9, "pdq": 0.9, "effnet-lite0": 0.97, "*": 0.95}


def default_threshold(encoder: str | None, normalized: bool, verified: bool) -> float:
    table = DEFAULT_THRESHOLDS.get(encoder or "*", DEFAULT_THRESHOLDS["*"])
    return table.get((bool(normalized), bool(verified)), DEFAULT_THRESHOLDS["*"][(bool(normalized), bool(verified))])


# Encoders preferred for copy detection when the index has several (most copy-specific first).
PREFERRED_ENCODERS = ("sscd", "dinov2-base", "dinov2-small", "effnet-lite0", "clip-vit-l-14", "clip-vit-b-32")


@dataclass(frozen=True)
class MatchConfig:
    k: int = 10                       # global candidates per query (per query view, then merged)
    threshold: float | None = None    # report matches with final score >= threshold (None: default)
    normalize: bool = True            # subtract beta * similarity to the bg_k-th background neighbour
    bg_k: int = 1
    beta: float = 1.0
    background_size: int = 20000      # vectors sampled from the index when no background file exists
    skip_twins: bool = True           # background rows that are copies of a candidate are not background
    twin_threshold: float | None = None   # ... at this similarity (None: DEFAULT_TWIN_THRESHOLDS)
    verify: bool | None = None        # local verification; None = when the index has local features
    w_verify: float = 0.25            # tuned on half of the benchmark queries (0.5 before)
    n_verify: int = 10                # verify at most this many top candidates per query
    regions: bool = True              # also embed query regions (content boxes, trimmed borders)
    max_regions: int = 4              # views per query, the whole image included
    region_penalty: float = 0.1       # subtracted from the scores of region views (not the whole image)
    seed: int = 0
    pixel_check: bool = True          # default threshold only: confirm candidates from the files' pixels
    n_check: int = 5                  # ... the top candidates of each query (retrieval.copydetect.collection)

    def __post_init__(self):
        if self.k < 1 or self.bg_k < 1 or self.n_verify < 0 or self.background_size < 1 or self.max_regions < 1:
            raise InvalidQueryError("match k, bg_k, max_regions and background_size must be positive")

    def resolved_threshold(self, verified: bool, encoder: str | None = None) -> float:
        if self.threshold is not None:
            return float(self.threshold)
        return default_threshold(encoder, self.normalize, verified)

    def resolved_twin_threshold(self, encoder: str | None = None) -> float | None:
        if not self.skip_twins:
            return None
        if self.twin_threshold is not None:
            return float(self.twin_threshold)
        return DEFAULT_TWIN_THRESHOLDS.get(encoder or "*", DEFAULT_TWIN_THRESHOLDS["*"])


@dataclass
class Match:
    query: int          # index of the query image in the request
    id: str
    score: float        # final score (compare with the threshold)
    similarity: float   # raw global similarity
    background: float | None = None   # similarity to the bg_k-th background neighbour
    verify: float | None = None       # local verification score in [0, 1]
    region: tuple[int, int, int, int] | None = None   # query box (left, top, right, bottom) that matched;
                                                      # None = the whole query image
    check: str | None = None          # pdq / aligned / sscd: a pixel check confirmed the copy

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "score": round(float(self.score), 6), "similarity": round(float(self.similarity), 6)}
        if self.background is not None:
            out["background"] = round(float(self.background), 6)
        if self.verify is not None:
            out["verify"] = round(float(self.verify), 6)
        if self.region is not None:
            out["region"] = [int(v) for v in self.region]
        if self.check is not None:
            out["check"] = self.check
        return out


# -- similarity search over float or binary vectors ------------------------------------------
def knn(queries: np.ndarray, database: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by similarity: float unit rows (inner product) or packed binary codes
    (Hamming, reported as ``1 - 2h/nbits``). Returns (scores [q, k] desc, rows [q, k]; -1 = none)."""
    import faiss

    q, db = np.asarray(queries), np.asarray(database)
    k = int(k)
    if len(db) == 0 or k == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    kk = min(k, len(db))
    if db.dtype == np.uint8:
        index = faiss.IndexBinaryFlat(db.shape[1] * 8)
        index.add(np.ascontiguousarray(db))
        dist, rows = index.search(np.ascontiguousarray(pack_signs(q)), kk)
        scores = hamming_to_score(dist, db.shape[1] * 8)
    else:
        index = faiss.IndexFlatIP(db.shape[1])
        index.add(np.ascontiguousarray(db, dtype=np.float32))
        scores, rows = index.search(np.ascontiguousarray(q, dtype=np.float32), kk)
    if kk < k:
        pad = k - kk
        scores = np.concatenate([scores, np.full((len(q), pad), -np.inf, np.float32)], axis=1)
        rows = np.concatenate([rows, np.full((len(q), pad), -1, np.int64)], axis=1)
    return scores.astype(np.float32), rows.astype(np.int64)


# -- score normalisation ----------------------------------------------------------------------
@dataclass
class Background:
    """Vectors of unrelated images (float unit rows or packed codes), optionally with index ids
    (when sampled from the index itself, so a candidate can be skipped as its own background)."""

    vectors: np.ndarray
    ids: np.ndarray | None = None      # str ids, or None for an external background set
    source: str = "file"               # file | index-sample

    def __len__(self) -> int:
        return len(self.vectors)


def pair_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Similarity of matching rows of ``a`` and ``b``: inner product of float rows, or ``1 - 2h/nbits``
    of packed binary codes (the scale ``knn`` reports)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype == np.uint8:
        return hamming_to_score(hamming_distance(a, b), a.shape[-1] * 8).astype(np.float32)
    return np.einsum("...d,...d->...", a.astype(np.float32), b.astype(np.float32))


def background_similarity(queries: np.ndarray, background: Background, k: int,
                          candidate_ids: Sequence[Sequence[str]] | None = None, *,
                          candidate_vectors: Sequence[np.ndarray] | None = None,
                          twin_threshold: float | None = None, spare: int = 16) -> np.ndarray:
    """Similarity of each query to its ``k``-th nearest background vector.

    Without ``candidate_ids``: ``[q]``. With ``candidate_ids`` (per query, the ids being scored) and
    a background carrying ids: ``[q, c]``, where for candidate ``c`` background rows whose id equals
    ``c`` are skipped before taking the ``k``-th (never normalise a copy away by its own original).
    With ``candidate_vectors`` (per query, the candidates' vectors) and ``twin_threshold``, background
    rows whose similarity to the candidate is ``>= twin_threshold`` are skipped too: they are copies of
    the candidate (a collection that holds a picture twice), not unrelated images.
    """
    if len(background) == 0:
        raise InvalidQueryError("the background set is empty")
    twins = twin_threshold is not None and candidate_vectors is not None and candidate_ids is not None
    if candidate_ids is None or (background.ids is None and not twins):
        scores, _ = knn(queries, background.vectors, k)
        kth = scores[:, k - 1]
        kth = np.where(np.isfinite(kth), kth, scores[:, :1].min(axis=1) if scores.size else 0.0)
        if candidate_ids is None:
            return kth.astype(np.float32)
        return np.repeat(kth[:, None], max((len(c) for c in candidate_ids), default=0), axis=1).astype(np.float32)
    width = max((len(c) for c in candidate_ids), default=0)
    # spare neighbours: the candidate itself (and its copies) may be among them
    scores, rows = knn(queries, background.vectors, k + (spare if twins else 1))
    out = np.zeros((len(queries), width), np.float32)
    for qi, cands in enumerate(candidate_ids):
        valid = rows[qi] >= 0
        q_scores, q_rows = scores[qi][valid], rows[qi][valid]
        bg_ids = None if background.ids is None else [background.ids[r] for r in q_rows]
        twin = None
        if twins and len(cands):
            cv = np.asarray(candidate_vectors[qi])
            bv = background.vectors[q_rows]
            twin = pair_similarity(cv[:, None, :], bv[None, :, :]) >= twin_threshold   # [c, neighbours]
        for ci, cid in enumerate(cands):
            keep = np.ones(len(q_rows), bool)
            if bg_ids is not None:
                keep &= np.array([b != cid for b in bg_ids], bool)
            if twin is not None:
                keep &= ~twin[ci]
            vals = q_scores[keep]
            out[qi, ci] = vals[k - 1] if len(vals) >= k else (vals[-1] if len(vals) else q_scores[-1] if len(q_scores)
                                                              else 0.0)
    return out


def normalize_scores(similarities: np.ndarray, background_kth: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """``sim - beta * bg``, with ``bg`` per query ``[q]`` or per (query, candidate) ``[q, c]``."""
    sim = np.asarray(similarities, np.float32)
    bg = np.asarray(background_kth, np.float32)
    if bg.ndim == 1:
        bg = bg[:, None]
    return (sim - np.float32(beta) * bg).astype(np.float32)


def final_scores(similarities: np.ndarray, config: MatchConfig, *, background_kth: np.ndarray | None = None,
                 verify: np.ndarray | None = None) -> np.ndarray:
    """The documented score: ``sim [- beta * bg] [+ w_verify * verify]`` (NaN verify counts as 0)."""
    out = np.asarray(similarities, np.float32)
    if config.normalize:
        if background_kth is None:
            raise InvalidQueryError("score normalisation needs the background similarities")
        out = normalize_scores(out, background_kth, config.beta)
    if verify is not None:
        out = out + np.float32(config.w_verify) * np.nan_to_num(np.asarray(verify, np.float32))
    return out.astype(np.float32)


def merge_views(owner: np.ndarray, scores: np.ndarray, rows: np.ndarray, n_queries: int,
                k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query, the best ``k`` distinct rows over all of its views, each with its best score.

    ``owner[v]`` is the query of view ``v``; ``scores``/``rows`` are ``[views, c]`` (rows -1 = none).
    Returns ``(scores [n, k] desc, rows [n, k], view [n, k])``, padded with -inf / -1 / -1; ties keep the
    earlier view (the whole image comes first)."""
    owner = np.asarray(owner, np.int64)
    out_s = np.full((n_queries, k), -np.inf, np.float32)
    out_r = np.full((n_queries, k), -1, np.int64)
    out_v = np.full((n_queries, k), -1, np.int64)
    for qi in range(n_queries):
        best: dict[int, tuple[float, int]] = {}
        for v in np.nonzero(owner == qi)[0]:
            for sc, r in zip(scores[v], rows[v]):
                r = int(r)
                if r < 0 or not np.isfinite(sc):
                    continue
                if r not in best or sc > best[r][0]:
                    best[r] = (float(sc), int(v))
        top = sorted(best.items(), key=lambda t: (-t[1][0], t[1][1]))[:k]
        for ci, (r, (sc, v)) in enumerate(top):
            out_s[qi, ci], out_r[qi, ci], out_v[qi, ci] = sc, r, v
    return out_s, out_r, out_v


def view_penalties(owner: np.ndarray, penalty: float) -> np.ndarray:
    """``penalty`` for every view but the first of its query (the whole image), ``[views]``."""
    owner = np.asarray(owner, np.int64)
    first = np.r_[True, owner[1:] != owner[:-1]] if len(owner) else np.zeros(0, bool)
    return np.where(first, 0.0, float(penalty)).astype(np.float32)


@dataclass
class ScoredViews:
    """Candidates of every view of every query, scored and merged per query (see ``score_views``)."""

    scores: np.ndarray       # [n, k] final scores without verification
    rows: np.ndarray         # [n, k] candidate keys (-1 = none)
    views: np.ndarray        # [n, k] the view that gave each candidate its score
    sims: np.ndarray         # [n, k] raw similarity of that view
    background: np.ndarray | None   # [n, k] background similarity of that view


def score_views(sims: np.ndarray, rows: np.ndarray, owner: np.ndarray, n_queries: int, config: MatchConfig,
                background_kth: np.ndarray | None = None) -> ScoredViews:
    """Normalised (``sim - beta * bg``) and penalised (region views) scores of each view's candidates,
    merged to the best ``config.k`` distinct candidates per query (max over views)."""
    sims = np.asarray(sims, np.float32)
    view_final = final_scores(sims, config, background_kth=background_kth)
    view_final = view_final - view_penalties(owner, config.region_penalty)[:, None]
    merged, mrows, mviews = merge_views(owner, view_final, rows, n_queries, config.k)
    msims = np.full(merged.shape, np.nan, np.float32)
    mbg = None if background_kth is None else np.full(merged.shape, np.nan, np.float32)
    bgk = None if background_kth is None else np.asarray(background_kth, np.float32)
    for qi, ci in zip(*np.nonzero(mrows >= 0)):
        v = mviews[qi, ci]
        col = int(np.nonzero(rows[v] == mrows[qi, ci])[0][0])
        msims[qi, ci] = sims[v, col]
        if mbg is not None:
            mbg[qi, ci] = bgk[v] if bgk.ndim == 1 else bgk[v, col]
    return ScoredViews(merged, mrows, mviews, msims, mbg)


def match_arrays(queries: np.ndarray, database: np.ndarray, ids: Sequence[str], config: MatchConfig, *,
                 background: Background | None = None, verify_fn=None, threshold: float | None = None,
                 owner: Sequence[int] | None = None, boxes: Sequence[Any] | None = None,
                 encoder: str | None = None) -> list[list[Match]]:
    """Copy matches of ``queries`` against ``database`` (pure arrays; the Engine path does the same
    through the index). ``verify_fn(view_no, row) -> float in [0, 1]`` adds local verification.

    With ``owner`` the rows of ``queries`` are *views* (``owner[v]`` = the query image of view ``v``,
    views of one query contiguous, its whole image first; ``boxes[v]`` its region or None): a
    candidate's score is its best score over the query's views."""
    n_views = len(queries)
    owner = np.arange(n_views) if owner is None else np.asarray(owner, np.int64)
    n_queries = int(owner.max()) + 1 if n_views else 0
    sims, rows = knn(queries, database, config.k)
    bg = None
    if config.normalize:
        if background is None:
            raise InvalidQueryError("score normalisation needs a background set")
        cand_ids = [[ids[r] for r in row if r >= 0] for row in rows]
        cand_vecs = [np.asarray(database)[row[row >= 0]] for row in rows]
        bg = background_similarity(queries, background, config.bg_k, cand_ids, candidate_vectors=cand_vecs,
                                   twin_threshold=config.resolved_twin_threshold(encoder))
        bg = _pad_columns(bg, rows.shape[1])
    scored = score_views(sims, rows, owner, n_queries, config, bg)
    ver = None
    if verify_fn is not None:
        ver = np.full(scored.rows.shape, np.nan, np.float32)
        for qi, ci in zip(*np.nonzero(scored.rows[:, :config.n_verify] >= 0)):
            ver[qi, ci] = float(verify_fn(int(scored.views[qi, ci]), int(scored.rows[qi, ci])))
    thr = config.resolved_threshold(ver is not None) if threshold is None else threshold
    return collect_matches(scored, [list(ids)] * n_queries, config, ver, thr, boxes)


def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1]))) if a.shape[1] < width else a


def collect_matches(scored: ScoredViews, ids: Sequence[Sequence[str]], config: MatchConfig, ver: np.ndarray | None,
                    threshold: float, boxes: Sequence[Any] | None = None) -> list[list[Match]]:
    """``Match`` lists (best first) of the candidates whose final score (``scored.scores`` plus
    ``w_verify * verify``) reaches ``threshold``; ``ids[q][row]`` names a candidate of query ``q``."""
    final = scored.scores.copy()
    if ver is not None:
        final = final + np.float32(config.w_verify) * np.nan_to_num(ver)
    out: list[list[Match]] = []
    for qi in range(len(final)):
        found = []
        for ci, r in enumerate(scored.rows[qi]):
            if r < 0 or not np.isfinite(final[qi, ci]) or final[qi, ci] < threshold:
                continue
            v = int(scored.views[qi, ci])
            box = None if boxes is None else boxes[v]
            found.append(Match(
                query=qi, id=ids[qi][r], score=float(final[qi, ci]), similarity=float(scored.sims[qi, ci]),
                background=None if scored.background is None else float(scored.background[qi, ci]),
                verify=None if ver is None or np.isnan(ver[qi, ci]) else float(ver[qi, ci]),
                region=None if box is None else tuple(int(x) for x in box)))
        found.sort(key=lambda m: -m.score)
        out.append(found)
    return out
