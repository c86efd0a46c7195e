"""Scoring for the copy-detection benchmark (``bench_copydetect.py``): DISC21 µAP / recall at 90 %
precision of the library's scoring (``evaluate``), the query views it scores (``query_views``) and the
local verification it can add (``LocalVerifier``)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from copydetect_data import FAMILIES, CopySet  # noqa: E402


# -- evaluation -------------------------------------------------------------------------------------
def evaluate(data: CopySet, db, bg, views, cfg, *, normalize: str, verify_local=None, groups=None, queries=None):
    """DISC21 µAP / recall at 90 % precision of the library's scoring (``retrieval.copydetect``).

    ``views``: ``{"v": [V, d], "owner": [V]}``, each query's whole image first, then its regions.
    ``normalize``: none | file (the background images) | index (``cfg.background_size`` rows sampled
    from the database, the candidate and its twins skipped). ``groups``: reference equivalence groups
    (a prediction of any reference of the true group is correct; predictions are collapsed to one per
    group and query, the best); None = strict ground truth (only the exact reference). ``queries``:
    evaluate these query numbers only (the scoring itself never looks at the ground truth)."""
    from dataclasses import replace

    from retrieval.copydetect.metrics import micro_average_precision, recall_at_precision, threshold_for_precision
    from retrieval.copydetect.scores import Background, background_similarity, knn, score_views

    cfg = replace(cfg, normalize=normalize != "none")
    vecs, owner = views["v"], views["owner"]
    n_q = len(data.queries)
    sims, rows = knn(vecs, db, cfg.k)
    bgs = None
    if normalize != "none":
        cand_ids = [[str(r) for r in row if r >= 0] for row in rows]
        cand_vecs = [db[row[row >= 0]] for row in rows]
        if normalize == "file":
            background = Background(bg)
        else:
            rng = np.random.default_rng(cfg.seed)
            sample = np.sort(rng.choice(len(db), size=min(cfg.background_size, len(db)), replace=False))
            background = Background(db[sample], np.asarray([str(i) for i in sample], dtype=object), "index-sample")
        bgs = background_similarity(vecs, background, cfg.bg_k, cand_ids, candidate_vectors=cand_vecs,
                                    twin_threshold=cfg.twin_threshold)
    scored = score_views(sims, rows, owner, n_q, cfg, bgs)
    final = scored.scores.copy()
    if verify_local is not None:
        for qi, ci in zip(*np.nonzero(scored.rows[:, : cfg.n_verify] >= 0)):
            final[qi, ci] += cfg.w_verify * verify_local(int(scored.views[qi, ci]), int(scored.rows[qi, ci]))
    group = np.arange(len(db)) if groups is None else np.r_[groups, np.arange(len(groups), len(db))]
    qs = np.arange(n_q) if queries is None else np.asarray(queries)
    scores, correct, top1 = [], [], {}
    for qi in qs:
        best: dict[int, tuple[float, bool]] = {}
        for sc, r in zip(final[qi], scored.rows[qi]):
            if r < 0 or not np.isfinite(sc):
                continue
            g = int(group[r])
            ok = bool(data.gt[qi] >= 0 and g == group[data.gt[qi]])
            if g not in best or sc > best[g][0]:
                best[g] = (float(sc), ok)
        ranked = sorted(best.values(), key=lambda t: -t[0])
        top1[qi] = bool(ranked and ranked[0][1])
        for sc, ok in ranked:
            scores.append(sc)
            correct.append(ok)
    n_gt = int((data.gt[qs] >= 0).sum())
    copies = [qi for qi in qs if data.gt[qi] >= 0]
    per_family = {}
    for fam in FAMILIES:
        m = [top1[qi] for qi in copies if data.family[qi] == fam]
        per_family[fam] = float(np.mean(m)) if m else float("nan")
    return {
        "uAP": micro_average_precision(scores, correct, n_gt),
        "R@P90": recall_at_precision(scores, correct, n_gt, 0.9),
        "thr@P90": threshold_for_precision(scores, correct, n_gt, 0.9),
        "top1_acc": float(np.mean([top1[qi] for qi in copies])),
        "per_family_top1": per_family,
    }


def query_views(q, regions=None):
    """Views for ``evaluate``: whole images only, or whole images plus ``regions`` (``region_views``)."""
    owner = np.arange(len(q))
    if regions is None or len(regions["owner"]) == 0:
        return {"v": q, "owner": owner}
    all_owner = np.r_[owner, regions["owner"]]
    order = np.argsort(all_owner, kind="stable")     # each query's whole image first
    return {"v": np.concatenate([q, regions["v"]])[order], "owner": all_owner[order], "order": order}


class LocalVerifier:
    """effnet-lite0 local features (PCA-128, 7x7 grid) + retrieval.rerank.verify_pair."""

    def __init__(self, db_l, q_l, grid=(7, 7)):
        from dataclasses import replace

        from retrieval.rerank.config import DEFAULT_CONFIG
        from retrieval.rerank.verify import verify_pair

        self.db_l, self.q_l, self.grid = db_l, q_l, grid
        p = grid[0] * grid[1]
        rr, cc = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
        self.pos = np.stack([rr.ravel(), cc.ravel()], 1)
        self.p = p
        self.fn = verify_pair
        self.cfg = replace(DEFAULT_CONFIG, allow_reflection=True)
        self.cache = {}

    def __call__(self, qi: int, row: int) -> float:
        key = (qi, row)
        if key not in self.cache:
            qd = np.asarray(self.q_l[qi], np.float32)
            cd = np.asarray(self.db_l[row], np.float32)
            self.cache[key] = self.fn(qd, self.pos, cd, self.pos, self.grid, self.grid, self.cfg).score
        return self.cache[key]
