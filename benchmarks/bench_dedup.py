"""`loupe dedup` with default flags: recall of planted copies and precision (issue 16).

Each run writes a folder of real pictures plus planted copies of some of them, indexes it with
`loupe index --encoder effnet-lite0` (a general-purpose index, as the README's tour builds), and runs
`loupe dedup` on it. Copy families (cycled over the picked originals):

  resize    scaled to 50-85 % and saved as JPEG quality 50-75 (the issue's case: 70 %, quality 60)
  reencode  the same size, JPEG quality 30-70
  crop      75-92 % of each side kept at a random offset, JPEG quality 85

  calibrate  the tuning data of benchmarks/bench_copydetect.py (Tux Paint stamps of its *reference*
             split): every candidate pair's check scores, and recall / precision over a grid of the
             PDQ and aligned-thumbnail thresholds (the library's defaults were chosen here)
  judge      pictures calibration never saw, with default flags: Tux Paint stamps of the held-out and
             background splits, and Fashion-MNIST test images (28 x 28, as the dataset ships them);
             before = `--check none` at the old per-encoder threshold (effnet-lite0 0.94)

Precision counts a reported pair as right when it is a planted (original, copy) pair or joins two
pictures that are the same up to mirroring (mean grey difference <= 4 at 32 x 32, as
bench_copydetect's reference groups; Fashion-MNIST holds a few such repeats); "strict" counts planted
pairs only.

  .venv/bin/python benchmarks/bench_dedup.py calibrate --n 250 --copies 90
  .venv/bin/python benchmarks/bench_dedup.py judge --stamps 320 --fmnist 1000 --copies 90
  .venv/bin/python benchmarks/bench_dedup.py judge --quick          # small sizes (make bench)

  scale      `loupe dedup --check none` on a large synthetic index with planted near-duplicates, built by
             `bench_scale.py --planted N --keep` (it saves planted-pairs.npy): wall time, peak RSS of the
             `loupe dedup` process, planted pairs found, and the pairs found vs exact range search on a subset
             (a random sample of rows plus the planted copies of the sampled originals)

  .venv/bin/python benchmarks/bench_scale.py --n 990000 --planted 10000 --dim 128 --shards 10 \
      --write-type flat --layout ivfpq --work /tmp/scale --keep
  .venv/bin/python benchmarks/bench_dedup.py scale --index /tmp/scale/n1000000-s10 --subset 20000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

FAMILIES = ("resize", "reencode", "crop")


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_copy(img: Image.Image, family: str, rng: random.Random) -> bytes:
    w, h = img.size
    if family == "resize":
        s = rng.uniform(0.5, 0.85)
        small = img.resize((max(8, int(w * s)), max(8, int(h * s))), Image.Resampling.BICUBIC)
        return _jpeg(small, rng.randint(50, 75))
    if family == "reencode":
        return _jpeg(img, rng.randint(30, 70))
    f = rng.uniform(0.75, 0.92)
    cw, ch = max(4, int(w * f)), max(4, int(h * f))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    return _jpeg(img.crop((x, y, x + cw, y + ch)), 85)


def stamp_images(split: str, n: int) -> list[Image.Image]:
    from copydetect_data import load_stamp, split_stamps

    names = ("holdout", "background") if split == "unseen" else (split,)
    paths = [p for s in names for p in split_stamps(0)[s]][:n]
    return [load_stamp(p) for p in paths]


def fmnist_images(n: int, start: int = 65000) -> list[Image.Image]:
    from retrieval.testing.samples import fashion_mnist

    arr = fashion_mnist("all")[0][start:start + n]
    return [Image.fromarray(a).convert("RGB") for a in arr]


def equivalence(images: list[Image.Image]) -> np.ndarray:
    from copydetect_data import reference_groups

    return reference_groups(images)


def build_set(folder: Path, images: list[Image.Image], n_copies: int, seed: int = 1) -> dict:
    """Originals as PNG + planted copies; returns {path: (original number, family)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    truth = {}
    for i, img in enumerate(images):
        p = (folder / f"o{i:05d}.png").resolve()
        img.save(p)
        truth[str(p)] = (i, "original")
    for j, i in enumerate(sorted(rng.sample(range(len(images)), min(n_copies, len(images))))):
        fam = FAMILIES[j % len(FAMILIES)]
        p = (folder / f"c{j:05d}_{fam}_o{i:05d}.jpg").resolve()
        p.write_bytes(make_copy(images[i], fam, rng))
        truth[str(p)] = (i, fam)
    return truth


def index(folder: Path, out: Path) -> float:
    from loupe.cli.main import main as loupe

    t0 = time.perf_counter()
    if not (out / "manifest.json").is_file():
        with redirect_stdout(io.StringIO()):
            rc = loupe(["index", str(folder), "--out", str(out), "--encoder", "effnet-lite0", "--device", "cpu",
                        "--workers", "0"])
        if rc != 0:
            raise SystemExit(f"indexing {folder} failed ({rc})")
    return time.perf_counter() - t0


def score_pairs(pairs: list[tuple[str, str]], truth: dict, groups: np.ndarray) -> dict:
    planted = {frozenset((p, q)) for p, (i, fam) in truth.items() if fam != "original"
               for q, (j, f2) in truth.items() if f2 == "original" and j == i}
    fam_of = {frozenset((p, q)): truth[p][1] for p, (i, fam) in truth.items() if fam != "original"
              for q, (j, f2) in truth.items() if f2 == "original" and j == i}
    got = {frozenset(p) for p in pairs}
    hit = got & planted
    equiv = {g for g in got - planted if len({groups[truth[x][0]] for x in g}) == 1}
    per_family = {f: (sum(1 for g in hit if fam_of[g] == f), sum(1 for g in planted if fam_of[g] == f))
                  for f in FAMILIES}
    n = len(got)
    return {"reported": n, "planted": len(planted), "found": len(hit), "recall": len(hit) / max(len(planted), 1),
            "precision": (len(hit) + len(equiv)) / n if n else None, "precision_strict": len(hit) / n if n else None,
            "same_picture_pairs": len(equiv), "per_family": per_family}


def run_dedup(idx: Path, extra: list[str]) -> tuple[dict, float]:
    from loupe.cli.main import main as loupe

    buf = io.StringIO()
    t0 = time.perf_counter()
    with redirect_stdout(buf):
        loupe(["dedup", str(idx), "--json", *extra])
    return json.loads(buf.getvalue()), time.perf_counter() - t0


def judge_one(label: str, images: list[Image.Image], copies: int, work: Path) -> list[str]:
    truth = build_set(work / "pictures", images, copies)
    groups = equivalence(images)
    t_index = index(work / "pictures", work / "index")
    lines = []
    for name, extra in (("before: `--check none` (threshold 0.94)", ["--check", "none"]),
                        ("after: default flags", [])):
        out, secs = run_dedup(work / "index", extra)
        r = score_pairs([(p["a_path"], p["b_path"]) if "a_path" in p else (p["a"], p["b"]) for p in out["pairs"]],
                        truth, groups)
        fam = ", ".join(f"{f} {a}/{b}" for f, (a, b) in r["per_family"].items())
        s = out["summary"]
        prec = "—" if r["precision"] is None else f"{r['precision']:.3f}"
        strict = "—" if r["precision_strict"] is None else f"{r['precision_strict']:.3f}"
        lines.append(f"| {label} | {name} | {len(images)} + {r['planted']} | {r['found']}/{r['planted']} "
                     f"({r['recall']:.3f}) | {fam} | {r['reported']} | {prec} | {strict} | "
                     f"{s.get('candidates', '—')} | {secs:.1f} |")
        print(lines[-1], json.dumps(s.get("decided_by", {})), flush=True)
    print(f"  {label}: indexed in {t_index:.0f} s", flush=True)
    return lines


def judge(args) -> list[str]:
    work = Path(args.work)
    lines = ["| pictures | dedup | images + planted copies | copies found (recall) | per family | pairs reported "
             "| precision | precision (planted only) | candidate pairs | dedup s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += judge_one("Tux Paint stamps (held-out + background splits)", stamp_images("unseen", args.stamps),
                       args.copies, work / f"stamps-{args.stamps}-{args.copies}")
    lines += judge_one("Fashion-MNIST test images 65,000+ (28 x 28)", fmnist_images(args.fmnist), args.copies,
                       work / f"fmnist-{args.fmnist}-{args.copies}")
    return lines


def calibrate(args) -> list[str]:
    from retrieval.copydetect.collection import CopyCheckConfig, PairChecker, _vector_blocks
    from retrieval.copydetect.dedup import DedupConfig, find_pairs
    from retrieval.engine.engine import Engine

    work = Path(args.work) / f"calibrate-{args.n}-{args.copies}"
    images = stamp_images("reference", args.n)
    truth = build_set(work / "pictures", images, args.copies)
    groups = equivalence(images)
    index(work / "pictures", work / "index")
    engine = Engine(work / "index", device="cpu")
    config = CopyCheckConfig()
    blocks, ids = _vector_blocks(engine, "effnet-lite0")
    cand = find_pairs(blocks, DedupConfig(threshold=config.candidate("effnet-lite0"), method="knn", k=config.k))
    checker = PairChecker(engine, "effnet-lite0", config)
    path = {i: engine.metadata(i)["path"] for i in ids}
    ev = []
    for a, b, s in zip(cand.a.tolist(), cand.b.tolist(), cand.score.tolist()):
        e = checker.evidence(ids[a], ids[b])
        ev.append((path[ids[a]], path[ids[b]], float(s), e["pdq"] if e["pdq"] is not None else -1.0,
                   e["aligned"] if e["aligned"] is not None else -1.0))
    base = score_pairs([(a, b) for a, b, *_ in ev], truth, groups)
    lines = [f"- {len(images)} reference-split stamps + {base['planted']} planted copies; {len(ev)} candidate pairs "
             f"(effnet-lite0 k={config.k}, cosine >= {config.candidate('effnet-lite0')}) hold "
             f"{base['found']}/{base['planted']} planted pairs", "",
             "| PDQ >= | aligned >= | recall | precision | pairs |", "|---|---|---|---|---|"]
    def fmt(r):
        p = "—" if r["precision"] is None else f"{r['precision']:.3f}"
        return f"{r['recall']:.3f} | {p} | {r['reported']}"

    for pt in (0.75, 0.8, 0.85):
        for at in (0.94, 0.95, 0.955, 0.96, 0.965, 0.97):
            r = score_pairs([(a, b) for a, b, s, p, al in ev if p >= pt or al >= at], truth, groups)
            lines.append(f"| {pt} | {at} | {fmt(r)} |")
    for thr in (0.9, 0.94):
        r = score_pairs([(a, b) for a, b, s, *_ in ev if s >= thr], truth, groups)
        lines.append(f"| cosine alone >= {thr} | | {fmt(r)} |")
    return lines


def scale(args) -> list[str]:
    import resource
    import subprocess

    from retrieval.copydetect.dedup import DedupConfig, find_pairs
    from retrieval.engine.engine import Engine
    from retrieval.index import store

    idx = Path(args.index)
    out = Path(args.work) / "scale-pairs.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "loupe", "dedup", str(idx), "--check", "none", "--threshold", str(args.threshold),
           "--candidates", args.candidates, "-k", str(args.k), "--device", args.device, "--out", str(out), "--json"]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if run.returncode not in (0, 1):
        raise SystemExit(run.stderr)
    result = json.loads(run.stdout)
    found = {(min(a, b), max(a, b)) for a, b in ((store.id_to_int(p["a"]), store.id_to_int(p["b"]))
                                                 for p in result["pairs"])}
    planted = np.load(idx / "planted-pairs.npy")
    planted_set = {(int(min(a, b)), int(max(a, b))) for a, b in planted}
    engine = Engine(idx, device="cpu")
    vecs = np.concatenate([v for _, v, _ in engine.all_vectors("synthetic")])
    engine.close()
    n = len(vecs)
    rng = np.random.default_rng(11)
    sample = rng.choice(n, args.subset, replace=False)
    copies = planted[np.isin(planted[:, 0], sample), 1]
    subset = np.unique(np.concatenate([sample, copies]))
    t1 = time.perf_counter()
    ref = find_pairs([vecs[subset]], DedupConfig(threshold=args.threshold, method="range"))
    exact_s = time.perf_counter() - t1
    exact = {(int(subset[a]), int(subset[b])) for a, b in ref.as_set()}
    inside = set(subset.tolist())
    got = {p for p in found if p[0] in inside and p[1] in inside}
    summary = result["summary"]
    hit, rec = len(found & planted_set), len(got & exact) / max(len(exact), 1)
    return ["## `loupe dedup` at scale (`benchmarks/bench_dedup.py scale`)", "",
            f"- command: `{' '.join(cmd[1:])}`; load average {os.getloadavg()[0]:.1f}",
            f"- {n:,} vectors ({len(planted):,} planted near-duplicates, cosine ~0.995 to their original); "
            f"candidates from {summary.get('candidates_from')}, k = {args.k}, threshold {args.threshold}",
            "", "| wall s (whole command) | dedup s (summary) | peak RSS MB | pairs | planted pairs found | "
                "subset rows | exact pairs in subset | found by dedup in subset | extra in subset | exact s (subset) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {wall:.1f} | {summary.get('seconds')} | {peak_mb:.0f} | {len(found):,} | "
            f"{hit:,} / {len(planted_set):,} ({hit / max(len(planted_set), 1):.4f}) "
            f"| {len(subset):,} | {len(exact):,} | {len(got & exact):,} ({rec:.4f}) | "
            f"{len(got - exact)} | {exact_s:.1f} |"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("calibrate", "judge", "scale"))
    ap.add_argument("--index", help="scale: the index folder bench_scale.py --keep left")
    ap.add_argument("--subset", type=int, default=20000, help="scale: rows checked against exact range search")
    ap.add_argument("--threshold", type=float, default=0.95, help="scale: pair threshold")
    ap.add_argument("-k", type=int, default=16, help="scale: neighbours per image")
    ap.add_argument("--candidates", default="index", help="scale: loupe dedup --candidates")
    ap.add_argument("--device", default="cpu", help="scale: loupe dedup --device (cuda: exact search on the GPU)")
    ap.add_argument("--n", type=int, default=250, help="calibrate: reference-split stamps")
    ap.add_argument("--stamps", type=int, default=320, help="judge: held-out stamps")
    ap.add_argument("--fmnist", type=int, default=1000, help="judge: Fashion-MNIST images")
    ap.add_argument("--copies", type=int, default=90, help="planted copies per set")
    ap.add_argument("--quick", action="store_true", help="small sizes (60 pictures, 15 copies per set)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/out/dedup"))
    args = ap.parse_args(argv)
    if args.quick:
        args.n = args.stamps = args.fmnist = 60
        args.copies = 15
    from retrieval.device import set_cpu_threads

    # (not torch.set_num_threads: loading an encoder would set all cores again)
    set_cpu_threads(2)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = {"calibrate": calibrate, "judge": judge, "scale": scale}[args.mode](args)
    cmd = "python benchmarks/bench_dedup.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\n{started}, `{cmd}`\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
