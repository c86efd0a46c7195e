"""Re-ranking: local scores against an exhaustive reference, buried copies rising, αQE/DBA, and
``rerank_hits`` through a minimal engine (multi-region scores, the query-crop second pass).
RANSAC and pair verification: test_rerank_verify.py; region windows and crop boxes: test_rerank_regions.py."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from retrieval.rerank.config import RerankConfig
from retrieval.rerank.regions import region_scores, region_vectors, region_windows
from retrieval.rerank.reranker import (
    alpha_query_expansion,
    database_side_augmentation,
    rerank_arrays,
    rerank_hits,
    text_patch_scores,
)
from tests._rerank_helpers import FakeSpec, unit


# -- exhaustive reference ----------------------------------------------------------------------
def reference_scores(q_desc, q_pos, q_grid, g, candidates, cfg: RerankConfig):
    """Loops over every token pair and every match triple: the scores rerank_arrays must give."""
    hq, wq = q_grid
    out = []
    P = len(q_desc)
    allsims = [[[float(np.dot(q_desc[i].astype(np.float64), c[j].astype(np.float64))) for j in range(len(c))]
                for i in range(P)] for c, _ in candidates]
    best = [[max(row) for row in sim] for sim in allsims]                 # [candidate][query token]
    base = [float(np.percentile([best[c][i] for c in range(len(candidates))], cfg.local_norm_pct))
            for i in range(P)]
    for (c_desc, c_pos), sim, bst in zip(candidates, allsims, best):
        Qn = len(c_desc)
        maxsim = sum(max(bst[i] - base[i], 0.0) for i in range(P)) / P
        # only query tokens above their background take part in matching
        sim = [row if bst[i] - base[i] > 0 else [-np.inf] * Qn for i, row in enumerate(sim)]
        best_c = [max(range(Qn), key=lambda j: (sim[i][j], -j)) for i in range(P)]
        best_q = [max(range(P), key=lambda i: (sim[i][j], -i)) for j in range(Qn)]
        matches = [(i, best_c[i]) for i in range(P) if best_q[best_c[i]] == i and sim[i][best_c[i]] >= cfg.min_match_sim
                   and np.isfinite(sim[i][best_c[i]])]
        pts = [(((q_pos[i][1] + .5) / wq, (q_pos[i][0] + .5) / hq), ((c_pos[j][1] + .5) / wq, (c_pos[j][0] + .5) / hq))
               for i, j in matches]
        thr = cfg.ransac_threshold / max(q_grid)
        best = (0, 0.0)
        for a, b, c in itertools.combinations(range(len(pts)), 3):
            S = np.array([[*pts[t][0], 1.0] for t in (a, b, c)])
            D = np.array([pts[t][1] for t in (a, b, c)])
            if abs(np.linalg.det(S)) <= 1e-9:
                continue
            A = np.linalg.solve(S, D).T
            sv = np.linalg.svd(A[:, :2], compute_uv=False)
            if not (sv[1] > 1 / cfg.max_scale and sv[0] < cfg.max_scale and sv[0] <= cfg.max_aspect * sv[1]
                    and np.linalg.det(A[:, :2]) > 0):
                continue
            r = [np.hypot(*(A @ [*p, 1.0] - np.array(d))) for p, d in pts]
            cnt = sum(x <= thr for x in r)
            cost = sum(x for x in r if x <= thr)
            if cnt > best[0] or (cnt == best[0] and cost < best[1]):
                best = (cnt, cost)
        # the library refits the winner on its inliers and keeps the refit when it is not worse
        n = best[0]
        needed = max(cfg.min_inliers, int(np.ceil(cfg.min_inlier_ratio * len(matches))))
        spatial = min(n, cfg.inlier_cap) / cfg.inlier_cap if n >= needed else 0.0
        out.append((maxsim, spatial))
    ms = np.array([o[0] for o in out])
    sp = np.array([o[1] for o in out])
    return ms, sp, g + cfg.w_local * ms + cfg.w_spatial * sp


def _synthetic_candidates(rng, grid=(5, 5), dim=16, n=6, copy_at=3):
    h, w = grid
    pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    q = unit(rng.normal(size=(h * w, dim)))
    cands = []
    for c in range(n):
        d = unit(rng.normal(size=(h * w, dim)))
        if c == copy_at:      # a shifted copy: query cell (r, c) appears at (r + 1, c + 1), noisy
            for i, (r, cc) in enumerate(pos):
                if r + 1 < h and cc + 1 < w:
                    d[(r + 1) * w + cc + 1] = unit(q[i] + 0.3 * rng.normal(size=dim))
        cands.append((d, pos.copy()))
    return q, pos, cands


def test_scores_equal_exhaustive_reference():
    rng = np.random.default_rng(3)
    q, pos, cands = _synthetic_candidates(rng)
    g = rng.uniform(0.3, 0.6, size=len(cands))
    cfg = RerankConfig(ransac_iters=10_000, min_inliers=4)     # every triple is enumerated
    got = rerank_arrays(q, pos, (5, 5), g, cands, (5, 5), cfg)
    ms, sp, fused = reference_scores(q, pos, (5, 5), g, cands, cfg)
    np.testing.assert_allclose(got.maxsim, ms, atol=1e-5)
    np.testing.assert_allclose(got.spatial, sp, atol=1e-9)
    np.testing.assert_allclose(got.fused, fused, atol=1e-5)
    assert got.inliers[3] >= 9 and np.argmax(got.fused) == 3


def test_scores_equal_reference_with_uneven_candidates_and_spatial_top():
    """Candidates with fewer tokens (padding) and one without any; spatial_top verifies only the best few."""
    rng = np.random.default_rng(6)
    q, pos, cands = _synthetic_candidates(rng, n=7, copy_at=2)
    cands[4] = (cands[4][0][:12], cands[4][1][:12])
    cands[5] = (cands[5][0][:0], cands[5][1][:0])
    g = rng.uniform(0.3, 0.6, size=len(cands))
    cfg = RerankConfig(ransac_iters=10_000, min_inliers=4)
    got = rerank_arrays(q, pos, (5, 5), g, cands, (5, 5), cfg)
    keep = [i for i in range(len(cands)) if i != 5]
    # the reference skips the empty candidate (its percentile background ignores it too)
    ms, sp, fused = reference_scores(q, pos, (5, 5), g[keep], [cands[i] for i in keep], cfg)
    np.testing.assert_allclose(got.maxsim[keep], ms, atol=1e-5)
    np.testing.assert_allclose(got.spatial[keep], sp, atol=1e-9)
    assert got.maxsim[5] == 0 and got.spatial[5] == 0 and got.fused[5] == pytest.approx(g[5])
    assert np.argmax(got.fused) == 2
    # spatial_top=1: only the candidate ranked first without the spatial term is verified
    top1 = rerank_arrays(q, pos, (5, 5), g, cands, (5, 5), RerankConfig(ransac_iters=10_000, min_inliers=4,
                                                                         spatial_top=1))
    first = int(np.argmax(g + cfg.w_local * got.maxsim))
    assert [i for i, v in enumerate(top1.verifications) if v is not None] == [first]
    assert top1.spatial[first] == got.spatial[first]


# -- real images: a buried crop/rotated copy rises ----------------------------------------------
def _crop_rotate(img, frac, angle, cx, cy):
    w, h = img.size
    cw, ch = int(w * frac), int(h * frac)
    x0, y0 = int((w - cw) * cx), int((h - ch) * cy)
    return img.crop((x0, y0, x0 + cw, y0 + ch)).rotate(angle, resample=Image.BICUBIC, fillcolor=(255, 255, 255))


def test_buried_copy_rises_to_top_after_verification(effnet, photos):
    names = [n for n in ("astronaut", "coffee", "rocket", "camera", "horse", "page", "brick", "grass", "moon")
             if n in photos]
    db = [photos[n] for n in names]
    G, T, grid = effnet.encode_images_and_local(db)
    pos = np.stack(np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)
    query = _crop_rotate(photos["astronaut"], 0.55, 20, 0.2, 0.3)
    qg, qt, _ = effnet.encode_images_and_local([query])
    true = names.index("astronaut")
    g = (G @ qg[0]).astype(np.float64)
    # bury the copy: every distractor gets a global score above the copy's
    g_buried = g.copy()
    g_buried[true] = g.min() - 0.05 if true != np.argmin(g) else g[true]
    order_before = np.argsort(-g_buried)
    assert order_before[0] != true and order_before[-1] == true
    res = rerank_arrays(qt[0], pos, grid, g_buried, [(T[i], pos) for i in range(len(db))], grid, RerankConfig())
    assert int(np.argmax(res.fused)) == true
    assert res.inliers[true] >= RerankConfig().min_inliers


# -- αQE / DBA / text --------------------------------------------------------------------------
def test_alpha_qe_and_dba():
    q = unit(np.array([1.0, 0.0, 0.0]))
    v = unit(np.array([[0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.1]]))
    e = alpha_query_expansion(q, v, alpha=1.0)
    ref = q + (v @ q).clip(0) @ v
    np.testing.assert_allclose(e, ref / np.linalg.norm(ref), atol=1e-6)
    d = database_side_augmentation(v, k=1, alpha=1.0)
    assert d.shape == v.shape and np.allclose(np.linalg.norm(d, axis=1), 1, atol=1e-5)
    # row 0's nearest other vector is row 1 (cos 0.11) → pulled towards it
    assert d[0, 1] > v[0, 1]


def test_text_patch_scores_top_fraction():
    t = np.array([1.0, 0.0], np.float32)
    c1 = np.array([[1.0, 0.0]] + [[0.0, 1.0]] * 7, np.float32)    # one matching patch of 8
    c2 = np.array([[0.6, 0.8]] * 8, np.float32)
    s = text_patch_scores(t, [c1, c2], top_frac=0.125)
    assert s[0] == pytest.approx(1.0) and s[1] == pytest.approx(0.6)


# -- rerank_hits through a minimal engine --------------------------------------------------------
@dataclass
class _Hit:
    id: str
    score: float
    shard: int
    row: int


def _hits_without_the_original(vecs, q_vec):
    """The global top 6 among images 0..10 (the original, image 11, left out), and an exact search."""
    g_all = vecs @ q_vec
    ranked = [int(i) for i in np.argsort(-g_all[:11])]
    hits = [_Hit(f"c{i}", float(g_all[i]), 0, i) for i in ranked[:6]]

    def search(v, n):
        s = vecs @ np.asarray(v, np.float32)
        return [_Hit(f"c{i}", float(s[i]), 0, int(i)) for i in np.argsort(-s)[:n]]

    return hits, search


@dataclass
class _Ctx:
    vector: np.ndarray
    encoder: str
    text: str | None = None
    image: object = None
    image_id: str | None = None
    instruction: str | None = None
    local: object = None


class _Entry:
    def __init__(self, grid):
        self.local_features = {"dim": 16, "grid": list(grid), "per_image": 25, "dtype": "float16"}


class _Manifest:
    def __init__(self, grid):
        self.encoders = {"fake": _Entry(grid)}


class FakeEngine:
    """What rerank_hits needs from retrieval.engine.Engine, over in-memory arrays."""

    def __init__(self, tmp_path, vectors, locals_, ids, grid):
        self.index_dir = tmp_path
        self.manifest = _Manifest(grid)
        self._v, self._l, self._ids = vectors, locals_, ids

    def hit_for_id(self, encoder, image_id):
        r = self._ids.index(image_id)
        return _Hit(image_id, 1.0, 0, r)

    def local_features(self, encoder, hits):
        return [self._l[h.row] for h in hits]

    def vectors(self, encoder, hits):
        return self._v[[h.row for h in hits]]


def test_rerank_hits_with_engine(tmp_path):
    rng = np.random.default_rng(5)
    q, pos, cands = _synthetic_candidates(rng, n=8, copy_at=5)
    ids = ["q"] + [f"c{i}" for i in range(8)]
    locals_ = [(q, pos)] + cands
    vecs = unit(rng.normal(size=(9, 8)))
    eng = FakeEngine(tmp_path, vecs, locals_, ids, (5, 5))
    hits = [_Hit(f"c{i}", 0.9 - 0.01 * i, 0, i + 1) for i in range(8)]
    ctx = _Ctx(vector=vecs[0], encoder="fake", image_id="q")
    out = rerank_hits(eng, ctx, hits, k=3)
    assert [h.id for h in out][0] == "c5" and len(out) == 3
    assert out[0].score > out[1].score >= out[2].score
    ref = rerank_arrays(q, pos, (5, 5), np.array([h.score for h in hits]), cands, (5, 5))
    assert out[0].score == pytest.approx(ref.fused[5])
    # αQE re-scores the global term with the expanded query
    out_qe = rerank_hits(eng, ctx, hits, k=8, config={"qe": True, "qe_k": 1})
    assert {h.id for h in out_qe} == {h.id for h in hits}
    # no local features in the index: global order, truncated to k
    eng.manifest.encoders["fake"].local_features = None
    assert [h.id for h in rerank_hits(eng, ctx, hits, k=4)] == ["c0", "c1", "c2", "c3"]
    # text query with an encoder whose local features are not in text space: global order
    assert [h.id for h in rerank_hits(eng, _Ctx(vector=vecs[0], encoder="fake", text="x"), hits, k=2)] == ["c0", "c1"]


def test_rerank_hits_regions_expand_and_rescore(tmp_path):
    """Multi-region scores through rerank_hits: a candidate found only by a query region joins the
    shortlist, and every fused score equals global + w_region · max-over-regions (exhaustive)."""
    rng = np.random.default_rng(9)
    dim, grid = 8, (5, 5)
    vecs = unit(rng.normal(size=(12, dim)))
    tokens = unit(rng.normal(size=(25, dim)))
    t = tokens.reshape(5, 5, dim)
    t[0:3, 2:5] = vecs[11]                        # the object of image 11, pasted in the query's corner
    q_vec = unit(tokens.mean(axis=0, keepdims=True))[0]
    eng = FakeEngine(tmp_path, vecs, [None] * 12, [f"c{i}" for i in range(12)], grid)
    eng.manifest.encoders["fake"].local_features = None       # regions need only the global vectors
    hits, search = _hits_without_the_original(vecs, q_vec)   # image 11 is not among the 6 hits
    g_all = vecs @ q_vec

    ctx = _Ctx(vector=q_vec, encoder="fake", image=object())
    ctx.local = (tokens, grid)
    cfg = {"regions": True, "w_region": 1.0, "region_sizes": (3,), "region_stride": 1, "region_expand": 1,
           "n_candidates": 6, "crop": False}
    out = rerank_hits(eng, ctx, hits, k=6, config=cfg, search=search)
    assert out[0].id == "c11"
    regions = [unit(t[r:r + 3, c:c + 3].reshape(-1, dim).mean(axis=0, keepdims=True))[0]
               for r in range(3) for c in range(3)]
    for h in out:
        i = int(h.id[1:])
        assert h.score == pytest.approx(float(g_all[i]) + max(float(vecs[i] @ r) for r in regions), abs=1e-5)
    # the shortlist stays at n_candidates: the union is cut by global + w_region · region
    assert len(out) == 6
    # without a search function, regions only re-score the given hits
    out2 = rerank_hits(eng, ctx, hits, k=6, config=cfg)
    assert {h.id for h in out2} == {h.id for h in hits}


# -- query-crop second pass ----------------------------------------------------------------------
class _CropEncoder:
    """Embeds an image as ``unit(f · object + (1 - f) · background)``, f = its fraction of red pixels
    (the pasted object); records the crops it was given."""

    def __init__(self, obj, background, spec):
        self.obj, self.bg, self.spec, self.sizes = obj, background, spec, []

    def encode_images(self, images):
        out = []
        for im in images:
            a = np.asarray(im.convert("RGB"), np.int32)
            f = float(((a[..., 0] > 200) & (a[..., 1] < 50)).mean())
            self.sizes.append(im.size)
            out.append(unit(f * self.obj + (1 - f) * self.bg))
        return np.stack(out)


def _paste_scene(tmp_path):
    """12 indexed images; the query = image 11's object (red) pasted at pixels (112, 56)-(224, 168) of a
    280² white picture whose 5×5 token grid (56-pixel cells) mostly describes the background."""
    rng = np.random.default_rng(21)
    dim, grid = 32, (5, 5)
    vecs = unit(rng.normal(size=(12, dim)))
    bg = unit(rng.normal(size=dim))                     # the background picture (not indexed)
    tokens = np.tile(bg, (25, 1)) + 0.05 * rng.normal(size=(25, dim))
    t = tokens.reshape(5, 5, dim)
    t[1:3, 2:4] = unit(0.35 * vecs[11] + bg)            # the object's cells: dominated by their surroundings
    tokens = unit(tokens)
    q_vec = unit(tokens.mean(axis=0, keepdims=True))[0]
    img = Image.new("RGB", (280, 280), (255, 255, 255))
    img.paste((230, 10, 10), (112, 56, 224, 168))
    eng = FakeEngine(tmp_path, vecs, [None] * 12, [f"c{i}" for i in range(12)], grid)
    eng.manifest.encoders["fake"].local_features = None
    enc = _CropEncoder(vecs[11], bg, FakeSpec("sscd"))
    eng.encoder = lambda name: enc
    ctx = _Ctx(vector=q_vec, encoder="fake", image=img)
    ctx.local = (tokens, grid)
    return eng, enc, ctx, vecs, q_vec


def test_crop_pass_finds_a_pasted_object_missed_by_global_search(tmp_path):
    eng, enc, ctx, vecs, q_vec = _paste_scene(tmp_path)
    hits, search = _hits_without_the_original(vecs, q_vec)   # image 11 is not among the 6 hits
    g_all = vecs @ q_vec

    base = {"regions": True, "w_region": 1.0, "region_sizes": (2,), "region_stride": 1, "region_expand": 0,
            "n_candidates": 6, "local": False, "spatial": False, "crop": False}
    cfg = {**base, "crop": True, "crop_select": "novel", "crop_margin": 0.5, "crop_expand": 2, "w_crop": 1.0,
           "crop_fuse": "sum"}
    # without the crop pass (and the regions' own search off) the original never appears
    assert "c11" not in [h.id for h in rerank_hits(eng, ctx, hits, k=6, config=base, search=search)]
    out = rerank_hits(eng, ctx, hits, k=6, config=cfg, search=search)
    assert out[0].id == "c11" and len(out) == 6
    # one crop: window (1, 2, 3, 4) grown by half a cell = pixels (84, 28, 252, 196), a 168² crop
    assert enc.sizes == [(168, 168)]
    crop_vec = enc.encode_images([ctx.image.crop((84, 28, 252, 196))])[0]
    enc.sizes.pop()
    windows = region_windows((5, 5), (2,), 1)
    regions = region_vectors(ctx.local[0], (5, 5), windows)
    for h in out:
        i = int(h.id[1:])
        want = float(g_all[i]) + float(region_scores(regions, vecs[i:i + 1])[0]) + float(vecs[i] @ crop_vec)
        assert h.score == pytest.approx(want, abs=1e-5)
    # crop_fuse="max": the region term becomes max(region, crop)
    out_max = rerank_hits(eng, ctx, hits, k=6, config={**cfg, "crop_fuse": "max"}, search=search)
    assert out_max[0].id == "c11"
    for h in out_max:
        i = int(h.id[1:])
        want = float(g_all[i]) + max(float(region_scores(regions, vecs[i:i + 1])[0]), float(vecs[i] @ crop_vec))
        assert h.score == pytest.approx(want, abs=1e-5)
    assert len(enc.sizes) == 2
    enc.sizes.pop()
    # without a search function the crop only re-scores; crop=False leaves the scores without the crop term
    assert "c11" not in [h.id for h in rerank_hits(eng, ctx, hits, k=6, config={**cfg, "crop_expand": 0})]
    off = rerank_hits(eng, ctx, hits, k=6, config={**cfg, "crop": False}, search=search)
    assert len(enc.sizes) == 2 and "c11" not in [h.id for h in off]


def test_crop_pass_rescues_a_low_ranked_original(tmp_path):
    """The original is in the shortlist at a low rank: "gain" picks the object's window, and the crop's
    score lifts it to the top; text queries and queries without an image are unaffected."""
    eng, enc, ctx, vecs, q_vec = _paste_scene(tmp_path)
    g_all = vecs @ q_vec
    ranked = [int(i) for i in np.argsort(-g_all)]
    hits = [_Hit(f"c{i}", float(g_all[i]), 0, i) for i in ranked]
    assert ranked.index(11) > 0
    cfg = {"regions": True, "region_sizes": (2,), "local": False, "spatial": False, "crop": True,
           "crop_select": "gain", "crop_margin": 0.5, "w_crop": 2.0, "crop_fuse": "sum"}
    out = rerank_hits(eng, ctx, hits, k=3, config=cfg)
    assert out[0].id == "c11" and enc.sizes == [(168, 168)]
    no_crop = rerank_hits(eng, ctx, hits, k=3, config={**cfg, "crop": False})
    assert no_crop[0].id != "c11"
    text = _Ctx(vector=q_vec, encoder="fake", text="a red square")
    assert [h.id for h in rerank_hits(eng, text, hits, k=3, config=cfg)] == [f"c{i}" for i in ranked[:3]]
    assert len(enc.sizes) == 1
