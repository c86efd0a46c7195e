"""Instance retrieval with hard transformations: global only vs + local re-ranking, + spatial
verification, + αQE (and DBA), on real images, with the re-ranking latency.

Database: Tux Paint stamps (``/usr/share/tuxpaint/stamps``, composited on white) and scikit-image
photos as references, the other stamps and Fashion-MNIST images (``/usr/share/datasets/fashion-mnist``)
as distractors. Queries: one per reference, a seeded hard transformation of it, cycling through
``crop`` (30–45 % of the area), ``rotate`` (20–45°, plus a crop to 55–75 %), ``perspective``
(corners moved by up to 18 %), ``overlay`` (shapes and text over ~30 % of a 70 % crop) and
``paste`` (the reference shrunk to 35–55 % of the side and pasted on another photo/stamp).
Each query has exactly one relevant image: AP = 1/rank within the top N (0 beyond).

The index is written with the public ``retrieval.store`` API (flat FAISS shard, PCA-reduced local
features, the same format ``loupe index --local-features`` writes) and searched with
``retrieval.engine.Engine``; re-ranking uses ``retrieval.rerank``. Fusion weights are tuned on the
even-numbered queries and reported on the odd ones (and on all).

    .venv/bin/python benchmarks/bench_rerank.py --distractors 5000 --references 200
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAMPS = Path("/usr/share/tuxpaint/stamps")
FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
TRANSFORMS = ("crop", "rotate", "perspective", "overlay", "paste")


# -- data --------------------------------------------------------------------------------------
def fashion_mnist(n: int, seed: int = 0) -> list[Image.Image]:
    with gzip.open(FMNIST) as fh:
        raw = fh.read()
    total = int.from_bytes(raw[4:8], "big")
    arr = np.frombuffer(raw, np.uint8, offset=16).reshape(total, 28, 28)
    idx = np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)
    return [Image.fromarray(255 - arr[i]).convert("RGB").resize((112, 112), Image.BICUBIC) for i in idx]


def stamps() -> list[Path]:
    return sorted(p for p in STAMPS.rglob("*.png") if "-mirror" not in p.name and "_mirror" not in p.name)


def load_stamp(path: Path, max_side: int = 400) -> Image.Image:
    from retrieval.images import load_image

    img = load_image(path)
    img.thumbnail((max_side, max_side), Image.BICUBIC)
    return img


def skimage_photos() -> list[Image.Image]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import skimage_photos as photos

    seen, out = set(), []
    for img in photos().values():
        key = hashlib.sha1(img.tobytes()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append(img)
    return out


# -- transformations ---------------------------------------------------------------------------
def _crop(img, rng, area_lo, area_hi):
    w, h = img.size
    area = rng.uniform(area_lo, area_hi)
    aspect = rng.uniform(0.8, 1.25)
    cw = int(min(w, w * np.sqrt(area * aspect)))
    ch = int(min(h, h * np.sqrt(area / aspect)))
    x0 = int(rng.integers(0, max(1, w - cw + 1)))
    y0 = int(rng.integers(0, max(1, h - ch + 1)))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def transform(img: Image.Image, kind: str, rng: np.random.Generator, backgrounds: list[Image.Image]) -> Image.Image:
    w, h = img.size
    if kind == "crop":
        return _crop(img, rng, 0.30, 0.45)
    if kind == "rotate":
        angle = float(rng.uniform(20, 45) * rng.choice([-1, 1]))
        return _crop(img, rng, 0.55, 0.75).rotate(angle, Image.BICUBIC, expand=True, fillcolor=(255, 255, 255))
    if kind == "perspective":
        d = 0.18
        src = [(0, 0), (w, 0), (w, h), (0, h)]
        dst = [(x + rng.uniform(-d, d) * w, y + rng.uniform(-d, d) * h) for x, y in src]
        a = []
        for (x, y), (u, v) in zip(dst, src):   # coefficients map output (dst) to input (src)
            a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
            a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        coeffs = np.linalg.solve(np.array(a, float), np.array(src, float).reshape(8))
        return img.transform((w, h), Image.PERSPECTIVE, tuple(coeffs), Image.BICUBIC, fillcolor=(255, 255, 255))
    if kind == "overlay":
        out = _crop(img, rng, 0.65, 0.75).copy()
        draw = ImageDraw.Draw(out)
        ow, oh = out.size
        for _ in range(3):
            x0, y0 = rng.uniform(0, 0.8) * ow, rng.uniform(0, 0.8) * oh
            x1, y1 = x0 + rng.uniform(0.15, 0.35) * ow, y0 + rng.uniform(0.15, 0.35) * oh
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.rectangle if rng.random() < 0.5 else draw.ellipse)((x0, y0, x1, y1), fill=color)
        draw.text((0.05 * ow, 0.85 * oh), "LOUPE (c) 2026", fill=(255, 0, 0))
        return out
    if kind == "paste":
        bg = backgrounds[int(rng.integers(len(backgrounds)))].copy().resize((448, 448), Image.BICUBIC)
        s = rng.uniform(0.35, 0.55)
        scale = s * 448 / max(w, h)
        obj = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
        x0 = int(rng.integers(0, 448 - obj.size[0] + 1))
        y0 = int(rng.integers(0, 448 - obj.size[1] + 1))
        bg.paste(obj, (x0, y0))
        return bg
    raise ValueError(kind)


# -- index -------------------------------------------------------------------------------------
def build_index(out: Path, enc, images: list[Image.Image], keys: list[str], batch: int = 32) -> None:
    import faiss

    from indexer.writer import LOCAL_DIM  # the dimension `loupe index --local-features` uses
    from retrieval import store

    vecs, toks = [], []
    grid = None
    t0 = time.perf_counter()
    for i in range(0, len(images), batch):
        g, t, grid = enc.encode_images_and_local(images[i:i + batch])
        vecs.append(g)
        toks.append(t.astype(np.float16))
        if (i // batch) % 20 == 0:
            print(f"  encoded {i + len(g)}/{len(images)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    vecs = np.concatenate(vecs)
    toks = np.concatenate(toks)
    rng = np.random.default_rng(0)
    sample = toks[rng.choice(len(toks), size=min(len(toks), 1000), replace=False)].reshape(-1, toks.shape[-1])
    reducer = store.LocalReducer.fit(sample.astype(np.float32), dim=LOCAL_DIM)
    reducer.save(store.pca_path(out, enc.name))
    h, w = grid
    pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    per_image = [(reducer.transform(t.astype(np.float32)), pos) for t in toks]
    shard = store.shard_name(0)
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    store.write_vectors(out, enc.name, shard, index)
    store.write_local(out, enc.name, shard, per_image)
    rows = []
    for key, img in zip(keys, images):
        sha = hashlib.sha256(key.encode()).hexdigest()
        rows.append({"id": store.content_id(sha), "source": key, "path": None, "caption": None,
                     "width": img.size[0], "height": img.size[1], "sha256": sha, "size": 0, "mtime": 0.0,
                     "aliases": "[]", "extra": "{}"})
    store.write_metadata(out, shard, rows)
    entry = store.EncoderEntry(name=enc.name, dim=int(vecs.shape[1]), modalities=list(enc.modalities),
                               local_features={"dim": reducer.dim, "grid": [h, w], "per_image": h * w,
                                               "dtype": "float16"})
    manifest = store.Manifest(encoders={enc.name: entry}, shards=[store.ShardEntry(shard, len(images))])
    store.write_manifest(out, manifest)


# -- evaluation --------------------------------------------------------------------------------
def ap_at(ranked_ids: list[str], relevant: str) -> tuple[float, bool]:
    try:
        r = ranked_ids.index(relevant)
    except ValueError:
        return 0.0, False
    return 1.0 / (r + 1), r == 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distractors", type=int, default=5000, help="Fashion-MNIST distractors (default 5000)")
    ap.add_argument("--references", type=int, default=200, help="stamps used as references (plus the photos)")
    ap.add_argument("--encoder", default="effnet-lite0")
    ap.add_argument("--n", type=int, default=100, help="re-rank the top N global candidates")
    ap.add_argument("--latency-queries", type=int, default=40)
    ap.add_argument("--workdir", default="/tmp/loupe-bench-rerank")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from retrieval import create_encoder
    from retrieval.engine import Engine, QueryContext
    from retrieval.rerank import DEFAULT_CONFIG, _expanded_scores, fuse_scores, rerank_arrays, rerank_hits

    rng = np.random.default_rng(args.seed)
    enc = create_encoder(args.encoder, device="cpu")
    t_start = time.perf_counter()

    all_stamps = stamps()
    order = rng.permutation(len(all_stamps))
    ref_paths = [all_stamps[i] for i in order[:args.references]]
    extra_paths = [all_stamps[i] for i in order[args.references:]]
    photos = skimage_photos()
    refs = [load_stamp(p) for p in ref_paths] + photos
    ref_keys = [f"stamp:{p.relative_to(STAMPS)}" for p in ref_paths] + [f"photo:{i}" for i in range(len(photos))]
    extras = [load_stamp(p) for p in extra_paths]
    extra_keys = [f"stamp:{p.relative_to(STAMPS)}" for p in extra_paths]
    fm = fashion_mnist(args.distractors, args.seed)
    fm_keys = [f"fmnist:{i}" for i in range(len(fm))]
    images, keys = refs + extras + fm, ref_keys + extra_keys + fm_keys
    print(f"database: {len(refs)} references ({args.references} stamps + {len(photos)} photos), "
          f"{len(extras)} other stamps, {len(fm)} Fashion-MNIST = {len(images)} images", flush=True)

    tag = hashlib.sha1(f"{args.encoder}|{args.references}|{args.distractors}|{args.seed}|v1".encode()).hexdigest()[:10]
    idx_dir = Path(args.workdir) / f"idx-{tag}"
    t0 = time.perf_counter()
    if not (idx_dir / "manifest.json").is_file():
        build_index(idx_dir, enc, images, keys)
    build_s = time.perf_counter() - t0
    engine = Engine(idx_dir, device="cpu")
    from retrieval import store

    key_to_id = {k: store.content_id(hashlib.sha256(k.encode()).hexdigest()) for k in keys}

    backgrounds = photos + extras[:50]
    queries, kinds, relevant = [], [], []
    for i, img in enumerate(refs):
        kind = TRANSFORMS[i % len(TRANSFORMS)]
        queries.append(transform(img, kind, rng, [b for b in backgrounds if b is not img]))
        kinds.append(kind)
        relevant.append(key_to_id[ref_keys[i]])
    print(f"queries: {len(queries)}; index built in {build_s:.0f}s", flush=True)

    # per query: global top-N, local components, vectors (for αQE / DBA)
    records = []
    t_q = time.perf_counter()
    for i, q in enumerate(queries):
        g, tok, grid = enc.encode_images_and_local([q])
        ctx = QueryContext(vector=g[0], encoder=enc.name, image=q)
        ctx.local = (tok[0], grid)
        hits = engine.search_vector(enc.name, g[0], args.n)
        from retrieval.rerank import query_local_features

        qd, qp, qg = query_local_features(engine, ctx)
        cands = engine.local_features(enc.name, hits)
        cfg = replace(DEFAULT_CONFIG, local=True, spatial=True)
        ls = rerank_arrays(qd, qp, qg, np.array([h.score for h in hits]), cands, qg, cfg)
        records.append({"ids": [h.id for h in hits], "g": ls.global_scores, "maxsim": ls.maxsim,
                        "spatial": ls.spatial, "inliers": ls.inliers, "vecs": engine.vectors(enc.name, hits),
                        "q": g[0]})
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(queries)} queries ({time.perf_counter() - t_q:.0f}s)", flush=True)

    def evaluate(cfg, subset):
        aps, r1 = [], []
        for i in subset:
            rec = records[i]
            if cfg is None:
                fused = rec["g"]
            else:
                fused = fuse_scores(rec["g"], rec["maxsim"], rec["spatial"], cfg)
                if cfg.qe or cfg.dba:
                    order = np.argsort(-fused, kind="stable")
                    fused = fused - rec["g"] + _expanded_scores(rec["q"], rec["vecs"], order, cfg)
            ranked = [rec["ids"][j] for j in np.argsort(-fused, kind="stable")]
            a, top1 = ap_at(ranked, relevant[i])
            aps.append(a)
            r1.append(top1)
        return 100 * float(np.mean(aps)), 100 * float(np.mean(r1))

    everything = list(range(len(queries)))
    tune, test = everything[0::2], everything[1::2]
    # tune the fusion weights on the even queries
    best = None
    for wl in (0.0, 0.25, 0.5, 1.0, 2.0):
        for ws in (0.0, 0.1, 0.25, 0.5, 1.0):
            cfg = replace(DEFAULT_CONFIG, w_local=wl, w_spatial=ws)
            m, _ = evaluate(cfg, tune)
            if best is None or m > best[0] + 1e-9:
                best = (m, wl, ws)
    _, wl, ws = best
    best_qe = None
    for k in (1, 2, 3, 5):
        for alpha in (1.0, 3.0):
            cfg = replace(DEFAULT_CONFIG, w_local=wl, w_spatial=ws, qe=True, qe_k=k, qe_alpha=alpha)
            m, _ = evaluate(cfg, tune)
            if best_qe is None or m > best_qe[0] + 1e-9:
                best_qe = (m, k, alpha)
    tuned = replace(DEFAULT_CONFIG, w_local=wl, w_spatial=ws)
    rows = [
        ("global only", None),
        (f"+ local re-rank (MaxSim, w_local={wl})", replace(tuned, spatial=False)),
        (f"+ spatial verification (w_spatial={ws})", tuned),
        (f"+ αQE (k={best_qe[1]}, α={best_qe[2]:g})", replace(tuned, qe=True, qe_k=best_qe[1], qe_alpha=best_qe[2])),
        ("+ αQE + DBA (k=2, α=3)", replace(tuned, qe=True, qe_k=best_qe[1], qe_alpha=best_qe[2], dba=True)),
        (f"library defaults (w_local={DEFAULT_CONFIG.w_local}, w_spatial={DEFAULT_CONFIG.w_spatial})", DEFAULT_CONFIG),
    ]
    qe_default = replace(DEFAULT_CONFIG, qe=True, qe_k=best_qe[1], qe_alpha=best_qe[2])
    rows.append(("library defaults + αQE", qe_default))
    table = []
    for name, cfg in rows:
        m_all, r_all = evaluate(cfg, everything)
        m_test, r_test = evaluate(cfg, test)
        table.append((name, m_test, r_test, m_all, r_all))
    per_kind = []
    for kind in TRANSFORMS:
        sub = [i for i in everything if kinds[i] == kind]
        per_kind.append((kind, len(sub), *evaluate(None, sub), *evaluate(DEFAULT_CONFIG, sub)))

    # latency on CPU (N candidates), same queries, warm
    lat_q = queries[: args.latency_queries]
    t_glob, t_two, t_one = [], [], []
    for q in lat_q:
        t0 = time.perf_counter()
        v = enc.encode_images([q])[0]
        engine.search_vector(enc.name, v, args.n)
        t_glob.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        v = enc.encode_images([q])[0]
        ctx = QueryContext(vector=v, encoder=enc.name, image=q)
        hits = engine.search_vector(enc.name, v, args.n)
        rerank_hits(engine, ctx, hits, k=20, config=tuned)
        t_two.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        g, tok, grid = enc.encode_images_and_local([q])
        ctx = QueryContext(vector=g[0], encoder=enc.name, image=q)
        ctx.local = (tok[0], grid)
        hits = engine.search_vector(enc.name, g[0], args.n)
        rerank_hits(engine, ctx, hits, k=20, config=tuned)
        t_one.append(time.perf_counter() - t0)
    ms = lambda xs: 1000 * float(np.median(xs))  # noqa: E731

    lines = [
        f"## Re-ranking: instance retrieval with hard transformations ({args.encoder})",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other jobs, torch threads {args.threads}, CPU only",
        f"- command: `.venv/bin/python benchmarks/bench_rerank.py --distractors {args.distractors} "
        f"--references {args.references}`",
        f"- database: {len(images)} images = {len(refs)} references ({args.references} Tux Paint stamps + "
        f"{len(photos)} scikit-image photos) + {len(extras)} other stamps + {len(fm)} Fashion-MNIST distractors;"
        f" queries: {len(queries)} (one per reference; {', '.join(TRANSFORMS)} in turn); one relevant each,"
        f" AP = 1/rank in the top {args.n}",
        f"- fusion weights tuned on the {len(tune)} even queries, figures on the {len(test)} odd ones"
        f" (and all {len(queries)})",
        "",
        "| method | mAP (test) | R@1 (test) | mAP (all) | R@1 (all) |",
        "|---|---:|---:|---:|---:|",
        *[f"| {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for n, a, b, c, d in table],
        "",
        "Per transformation (all queries), global → re-ranked with the library defaults:",
        "",
        "| transformation | queries | mAP global | R@1 global | mAP re-ranked | R@1 re-ranked |",
        "|---|---:|---:|---:|---:|---:|",
        *[f"| {k} | {n} | {a:.1f} | {b:.1f} | {c:.1f} | {d:.1f} |" for k, n, a, b, c, d in per_kind],
        "",
        f"Latency (median over {len(lat_q)} queries, N={args.n}, CPU): global search (embed + search) "
        f"{ms(t_glob):.1f} ms; with re-ranking, query tokens from a second forward pass "
        f"{ms(t_two):.1f} ms (×{np.median(t_two) / np.median(t_glob):.2f}); tokens kept from the embedding "
        f"pass (`ctx.local`) {ms(t_one):.1f} ms (×{np.median(t_one) / np.median(t_glob):.2f}).",
        f"Index build (encode {len(images)} images + PCA): {build_s:.0f} s (0 = reused); total run "
        f"{time.perf_counter() - t_start:.0f} s.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = ROOT / "benchmarks" / "results" / "rerank.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text() if out.is_file() else ""
    marker = "<!-- bench_attribution -->"
    tail = old[old.index(marker):] if marker in old else ""
    out.write_text(text + ("\n" + tail if tail else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
