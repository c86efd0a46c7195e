"""Copy-detection benchmark (DISC21-style) and whole-collection dedup at scale.

Copy detection
  references  = Tux Paint stamps (60 % of the leaf folders, composited on white) + scikit-image photos
  distractors = Fashion-MNIST images (--distractors, >= 10,000 for the full run), added to the database
  queries     = transformed copies of --copies references (12 transformation families, cycled) plus as
                many non-copy queries: the same transformations of stamps from held-out folders (20 %)
  background  = stamps of the remaining 20 % of folders + 500 Fashion-MNIST test images, never queried,
                never in the database (the "unrelated images" of score normalisation)
  views       = each query whole, or whole + the regions retrieval.copydetect.regions proposes (content boxes,
                trimmed borders); a candidate keeps its best score over the views (the library's scoring)
  metrics     = µAP (DISC21: all top-k predictions of all queries pooled, AP against the number of
                copy queries) and recall at 90 % precision, per encoder, with and without query
                regions, score normalisation (file background, or a sample of the index) and local
                verification (effnet-lite0 local features, PCA-128, retrieval.rerank.verify_pair).
                Ground truth: a reference and its equivalents (its `_mirror` twin, an exact duplicate)
                are one reference; the strict figures (exact reference only) are reported too.
  tuning      = a small grid on a seeded half of the queries (stratified by family), reported on the
                held-out half; latency = match_images end to end on an index of the references.

Scale (--scale N): `retrieval.copydetect.dedup` over N Fashion-MNIST images, each run in a fresh subprocess to
read its peak RSS: PDQ (binary Hamming range search) and raw-pixel float vectors (784-d) — the cost of
an exact all-pairs range search depends on N and d, not on which encoder made the vectors.

  .venv/bin/python benchmarks/bench_copydetect.py --distractors 10000 --copies 150 --scale 70000

Embeddings are cached under benchmarks/out/copydetect/ (re-runs only evaluate). Figures go to
benchmarks/results/copydetect.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from copydetect_data import (  # noqa: E402
    FAMILIES,
    CopySet,
    embed_all,
    reference_groups,
    region_views,
    stratified_split,
)
from copydetect_eval import LocalVerifier, evaluate, query_views  # noqa: E402
from copydetect_scale import run_scale_cli, scale_worker  # noqa: E402


# -- scale ------------------------------------------------------------------------------------------
def run_scale(sizes, kinds, thresholds) -> list[dict]:
    out = []
    for kind in kinds:
        for n in sizes:
            cmd = [sys.executable, __file__, "--scale-worker", kind, str(n), str(thresholds[kind])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            print("  scale", row, flush=True)
            out.append(row)
    return out


# -- the copy-detection run ------------------------------------------------------------------------
NORM_TEXT = {"none": "no", "file": "background file", "index": "index sample"}
TUNE_GRID = {"region_penalty": (0.0, 0.05, 0.1), "w_verify": (0.25, 0.5, 0.75, 1.0), "beta": (0.75, 1.0)}


def _fmt(r) -> str:
    thr = "—" if r["thr@P90"] is None else f"{r['thr@P90']:.3f}"
    return f"{r['uAP']:.3f} | {r['R@P90']:.3f} | {thr} | {r['top1_acc']:.3f}"


def run_copy_detection(args) -> list[str]:
    from dataclasses import replace

    from retrieval.copydetect.scores import MatchConfig

    t0 = time.perf_counter()
    data = CopySet(args.copies, args.distractors, args.seed)
    groups = reference_groups(data.ref_images)
    half = stratified_split(data.family, data.gt, args.seed)
    tune_q, held_q = np.nonzero(half)[0], np.nonzero(~half)[0]
    n_copy = int((data.gt >= 0).sum())
    n_sk = len([n for n in data.ref_names if n.startswith("skimage")])
    base = MatchConfig(k=args.k, n_verify=args.n_verify, max_regions=args.max_regions)
    lines = [
        f"- references: {data.n_refs} ({data.n_refs - n_sk} Tux Paint stamps + {n_sk} scikit-image photos), "
        f"{len(set(groups.tolist()))} distinct up to mirroring; distractors: {args.distractors} Fashion-MNIST; "
        f"database {data.n_refs + args.distractors} images",
        f"- queries: {len(data.queries)} = {n_copy} copies + {len(data.queries) - n_copy} non-copies "
        f"(held-out stamps), {len(FAMILIES)} transformation families: {', '.join(FAMILIES)}; tuning half "
        f"{len(tune_q)} queries, held-out half {len(held_q)} (stratified by family, seed {args.seed})",
        f"- background: file = {len(data.bg_images)} images (held-out stamp folders + 500 Fashion-MNIST test "
        f"images); index sample = {min(base.background_size, data.n_refs + args.distractors)} database vectors "
        f"(the candidate and its twins skipped); k={base.k}, bg_k={base.bg_k}, n_verify={base.n_verify}, "
        f"max_regions={base.max_regions}",
        "- µAP / R@P90 columns: ground truth with equivalent references (a stamp, its `_mirror` twin, exact "
        "duplicates) as one reference; *strict* = only the exact reference counts (the metric before)",
        "",
        "| encoder | query views | normalisation | local verification | µAP | recall @ 90% precision | "
        "threshold @ 90% P | top-1 acc (copies) | µAP strict | R@P90 strict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print(f"data set built in {time.perf_counter() - t0:.0f}s", flush=True)
    cache = Path(args.cache)
    encs = [e.strip() for e in args.encoders.split(",") if e.strip()]
    if "effnet-lite0" in encs:  # local features come from effnet; embed it first
        encs.remove("effnet-lite0")
        encs.insert(0, "effnet-lite0")
    eff = None          # (db_l, q_l, region locals) of effnet-lite0
    results, runs = {}, {}
    for name in encs:
        try:
            t0 = time.perf_counter()
            db, bg, q, db_l, q_l = embed_all(data, name, cache)
            regs = region_views(data, name, cache, base.max_regions, local=db_l is not None)
            print(f"{name}: embedded/loaded in {time.perf_counter() - t0:.0f}s", flush=True)
        except Exception as exc:  # noqa: BLE001 - an optional encoder that is not installed
            print(f"{name}: skipped ({type(exc).__name__}: {exc})", flush=True)
            lines.append(f"| {name} | — | — | — | skipped: {type(exc).__name__} | | | | | |")
            continue
        if db_l is not None:
            eff = (db_l, q_l, regs)
        view_sets = {"whole": query_views(q), "regions": query_views(q, regs)}
        verifiers = {}
        if eff is not None:
            verifiers["whole"] = LocalVerifier(eff[0], eff[1])
            reg_l = np.concatenate([eff[1], eff[2]["l"]])[view_sets["regions"]["order"]] if "order" in \
                view_sets["regions"] else eff[1]
            verifiers["regions"] = LocalVerifier(eff[0], reg_l)
        cfg = replace(base, twin_threshold=base.resolved_twin_threshold(name))
        runs[name] = (db, bg, view_sets, verifiers, cfg)
        for vname, views in view_sets.items():
            for norm in ("none", "file", "index"):
                for verify in (False, True) if verifiers else (False,):
                    t0 = time.perf_counter()
                    kw = dict(normalize=norm, verify_local=verifiers[vname] if verify else None)
                    r = evaluate(data, db, bg, views, cfg, groups=groups, **kw)
                    strict = evaluate(data, db, bg, views, cfg, groups=None, **kw)
                    key = f"{name}|{vname}|{norm}|{'verify' if verify else '-'}"
                    results[key] = r
                    ver_txt = "effnet-lite0 local + RANSAC" if verify else "no"
                    lines.append(f"| {name} | {vname} | {NORM_TEXT[norm]} | {ver_txt} | {_fmt(r)} | "
                                 f"{strict['uAP']:.3f} | {strict['R@P90']:.3f} |")
                    print(f"  {key}: uAP={r['uAP']:.3f} R@P90={r['R@P90']:.3f} strict uAP={strict['uAP']:.3f} "
                          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    if not results:
        return lines
    best = max(results, key=lambda k: results[k]["uAP"])
    lines += [
        "",
        f"Best configuration: `{best}` (µAP {results[best]['uAP']:.3f}). Top-1 accuracy of copy "
        "queries per transformation family:",
        "",
        "| " + " | ".join(FAMILIES) + " |",
        "|" + "---|" * len(FAMILIES),
        "| " + " | ".join(f"{results[best]['per_family_top1'][f]:.2f}" for f in FAMILIES) + " |",
    ]
    lines += tune_and_hold_out(data, groups, runs, best, tune_q, held_q)
    if "sscd" in runs and eff is not None and args.latency_queries > 0:
        lines += latency(data, cache, args.latency_queries)
    return lines


def tune_and_hold_out(data, groups, runs, best: str, tune_q, held_q) -> list[str]:
    """Grid over ``TUNE_GRID`` on the tuning half for the best configuration's encoder/views/normalisation
    (with verification), then the chosen and the library-default settings on both halves."""
    import itertools
    from dataclasses import replace

    name, vname, norm, _ = best.split("|")
    db, bg, view_sets, verifiers, cfg = runs[name]
    ver = verifiers.get(vname)
    scored = []
    for values in itertools.product(*TUNE_GRID.values()):
        c = replace(cfg, **dict(zip(TUNE_GRID, values)))
        r = evaluate(data, db, bg, view_sets[vname], c, normalize=norm, verify_local=ver, groups=groups,
                     queries=tune_q)
        scored.append((r["uAP"], r["R@P90"], values))
    scored.sort(key=lambda t: (-t[0], -t[1]))
    chosen = dict(zip(TUNE_GRID, scored[0][2]))
    lines = [
        "",
        f"Tuning on one half, held-out on the other (`{name}|{vname}|{norm}`, grid "
        + ", ".join(f"{k} ∈ {{{', '.join(str(v) for v in vs)}}}" for k, vs in TUNE_GRID.items())
        + f"): best on the tuning half {chosen}.",
        "",
        "| settings | half | µAP | recall @ 90% precision | threshold @ 90% P | top-1 acc (copies) |",
        "|---|---|---|---|---|---|",
    ]
    for label, c in (("tuned " + ", ".join(f"{k}={v}" for k, v in chosen.items()), replace(cfg, **chosen)),
                     ("library defaults", cfg)):
        for half_name, qs in (("tuning", tune_q), ("held-out", held_q), ("all", None)):
            r = evaluate(data, db, bg, view_sets[vname], c, normalize=norm, verify_local=ver, groups=groups,
                         queries=qs)
            lines.append(f"| {label} | {half_name} | {_fmt(r)} |")
            print(f"  {label} {half_name}: uAP={r['uAP']:.3f} R@P90={r['R@P90']:.3f}", flush=True)
    return lines


def latency(data, cache: Path, n: int) -> list[str]:
    """End-to-end ``retrieval.copydetect.match_images`` seconds per query (one image per call, as a
    server answers it), with and without query regions, on an index of the references built by
    `loupe index --encoder sscd --encoder effnet-lite0 --local-features` (cached under ``cache``)."""
    from loupe.cli.main import main as loupe
    from retrieval.copydetect.match import match_images
    from retrieval.copydetect.scores import MatchConfig
    from retrieval.engine.engine import Engine

    idx = cache / f"latency-index-s{data.seed}"
    if not (idx / "manifest.json").is_file():
        src = cache / f"latency-src-s{data.seed}"
        src.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(data.ref_images):
            im.save(src / f"ref{i:04d}.png")
        rc = loupe(["index", str(src), "--out", str(idx), "--encoder", "sscd", "--encoder", "effnet-lite0",
                    "--local-features", "--device", "cpu", "--workers", "0"])
        if rc != 0:
            return ["", f"Latency: indexing the references failed (exit {rc})."]
    engine = Engine(idx, device="cpu")
    qs = list(range(min(n, len(data.queries))))
    step = max(1, len(data.queries) // len(qs))
    qs = [i * step for i in range(len(qs))]             # spread over all families, copies and non-copies
    match_images(engine, [data.queries[0]], MatchConfig())   # warm-up: models, background, caches
    times = {True: [], False: []}
    for i, qi in enumerate(qs):
        for regions in ((True, False) if i % 2 else (False, True)):   # alternate the order
            t0 = time.perf_counter()
            match_images(engine, [data.queries[qi]], MatchConfig(regions=regions))
            times[regions].append(time.perf_counter() - t0)
    on, off = np.asarray(times[True]), np.asarray(times[False])
    return [
        "",
        f"Query latency, `match_images` end to end (sscd + effnet-lite0 verification, {len(qs)} queries "
        f"spread over all families, one image per call, index of the {data.n_refs} references, seconds, "
        f"median / 90th percentile): whole image only {np.median(off):.3f} / {np.percentile(off, 90):.3f}; "
        f"with query regions {np.median(on):.3f} / {np.percentile(on, 90):.3f} "
        f"(median extra {np.median(on - off):.3f} s per query).",
    ]


# -- main -------------------------------------------------------------------------------------------
def machine() -> str:
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}, CPU only"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--distractors", type=int, default=10000)
    ap.add_argument("--copies", type=int, default=150)
    ap.add_argument("--encoders", default="effnet-lite0,sscd,pdq")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--n-verify", type=int, default=10)
    ap.add_argument("--max-regions", type=int, default=4, help="query views (whole image included)")
    ap.add_argument("--latency-queries", type=int, default=40)
    ap.add_argument("--scale", type=int, default=0, help="dedup scale run over N Fashion-MNIST images (0: skip)")
    ap.add_argument("--scale-only", action="store_true")
    ap.add_argument(
        "--scale-cli",
        type=int,
        default=0,
        help="`loupe dedup` (the CLI, pdq) over an index of N Fashion-MNIST images (0: skip)",
    )
    ap.add_argument("--cache", default=str(ROOT / "benchmarks/out/copydetect"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/copydetect.md"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale-worker", nargs=3, metavar=("KIND", "N", "THRESHOLD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.scale_worker:
        kind, n, thr = args.scale_worker
        print(json.dumps(scale_worker(kind, int(n), float(thr))))
        return 0

    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(min(2, os.cpu_count() or 1))
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Copy detection and dedup benchmark",
        "",
        f"- date: {started}",
        f"- machine: {machine()}",
        "- command: `.venv/bin/python benchmarks/bench_copydetect.py "
        + " ".join(sys.argv[1:] if argv is None else argv) + "`",
        "",
    ]
    if not args.scale_only:
        lines += run_copy_detection(args)
    if args.scale:
        sizes = sorted({max(1000, args.scale // 4), max(1000, args.scale // 2), args.scale})
        rows = run_scale(sizes, ["pdq", "pixels"], {"pdq": 0.9, "pixels": 0.98})
        lines += [
            "",
            "## Dedup at scale (Fashion-MNIST)",
            "",
            "Each row is a fresh process: load Fashion-MNIST, embed, `retrieval.copydetect.dedup.deduplicate` over "
            "shards of 10,000 (exact range search, batches of 4,096 queries). PDQ: 256-bit codes from 64x64 "
            "inputs, Hamming range search (threshold 0.9 = Hamming <= 12). pixels: 784-d centred, "
            "L2-normalised pixel vectors, cosine range search (threshold 0.98).",
            "",
            "| vectors | N | vectors MB | embed s | dedup s | pairs | groups | images in groups | RSS before dedup MB "
            "| peak RSS during dedup MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['kind']} ({r['dim']}-d) | {r['n']} | {r['vectors_mb']} | {r['embed_s']} | {r['dedup_s']} | "
                f"{r['pairs']} | {r['groups']} | {r['images_in_groups']} | {r['rss_before_mb']} | {r['peak_rss_mb']} |"
            )
    if args.scale_cli:
        lines += [
            "",
            "## `loupe dedup` end to end (Fashion-MNIST, pdq index)",
            "",
            "Index written with `retrieval.index.store` (pdq codes of 64x64 inputs in binary shards of 10,000), then "
            "`loupe dedup IDX --threshold 0.9 --out pairs.parquet` as a subprocess (fresh process per row, so "
            "its peak RSS includes Python, torch and every CLI import; the 1,000-image row is that baseline).",
            "",
            "| N | build index s | `loupe dedup` wall s | peak RSS MB | summary |",
            "|---|---|---|---|---|",
        ]
        for n in sorted({1000, args.scale_cli}):
            r = run_scale_cli(n)
            print("  scale-cli", r, flush=True)
            lines.append(f"| {r['n']} | {r['build_s']} | {r['wall_s']} | {r['peak_rss_mb']} | {r['summary']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.scale_only and out.is_file():
        out.write_text(out.read_text() + "\n" + "\n".join(lines[6:]) + "\n")
    else:
        out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
