"""`make bench`: every benchmark in its quick configuration (small sizes, minutes in all on a laptop CPU),
each in its own process, with a time limit, its output kept under ``benchmarks/out/quick/``. The
figures of a quick run are a smoke test, not the published ones (``benchmarks/RESULTS.md`` gives the
full commands); nothing under ``benchmarks/results/`` is overwritten.

    .venv/bin/python benchmarks/run_all.py                  # all of them
    .venv/bin/python benchmarks/run_all.py --only dedup,copydetect
    .venv/bin/python benchmarks/run_all.py --list

Exit status 0 when every benchmark that ran succeeded (a benchmark that needs what this machine lacks,
e.g. a GPU or an index directory, is skipped and says why), 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "quick"


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no GPU
        return False


def quick_runs(out: Path, index_dir: str | None) -> dict[str, tuple[list[str] | None, str]]:
    """name -> (arguments of benchmarks/bench_<name>.py, or None to skip; why / what)."""
    o = str(out)
    gpu = _has_cuda()
    return {
        "index": (["--photos", "16", "--fmnist", "200", "--device", "cpu", "--workers", "0"],
                  "indexing pipeline vs bare forward, Fashion-MNIST indexing"),
        "server": (["--n", "500", "--seconds", "5", "--clients", "2", "--threads", "2", "--scale-n", "5000",
                    "--work", f"{o}/server", "--out", f"{o}/server.md"], "engine vs raw FAISS, HTTP, scale sweep"),
        # the modest run of RESULTS.md; embeddings cached in benchmarks/out/copydetect (first run: embeds)
        "copydetect": (["--distractors", "500", "--copies", "60", "--encoders", "effnet-lite0,pdq",
                        "--latency-queries", "0", "--out", f"{o}/copydetect.md"],
                       "copy detection µAP (DISC21-style)"),
        "dedup": (["judge", "--quick", "--work", f"{o}/dedup"], "loupe dedup recall / precision, default flags"),
        "rerank": (["--distractors", "200", "--references", "30", "--n", "20", "--latency-queries", "4",
                    "--latency-repeats", "1", "--workdir", f"{o}/rerank", "--out", f"{o}/rerank.md"],
                   "re-ranking mAP"),
        "attribution": (["--pairs", "6", "--no-write", "--out", f"{o}/attribution.md", "--dump", f"{o}/attr.npz"],
                        "attribution deletion test"),
        "colour": (["--images", "64", "--runs", "1", "--batch-size", "32"], "colour-names encoder cost"),
        "scale": (["--quick", "--work", f"{o}/scale"], "write shards vs `loupe optimize`: recall, latency"),
        "decode_bound": (["--runs", "1", "--skip-server"], "decode cost of huge images (byte bound, draft)"),
        "decode_parity": (["--photos", "8", "--device", "cpu", "--workers", "0"], "CPU vs GPU decode parity"),
        "gpu": ((["--images", "512", "--search-n", "20000", "--out", f"{o}/gpu.md"] if gpu else None),
                "GPU throughput" if gpu else "skipped: no CUDA device here"),
        "colour_latency": (([index_dir] if index_dir else None),
                           "colour-aware query latency" if index_dir else
                           "skipped: needs --index DIR (conse-effnet-lite0 + effnet-lite0 + colour-names)"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated names (see --list)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their quick arguments")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)")
    ap.add_argument("--index", default=None, metavar="DIR", help="an index for bench_colour_latency")
    ap.add_argument("--out", default=str(OUT), help="where quick outputs and logs go")
    args = ap.parse_args(argv)
    out = Path(args.out)
    runs = quick_runs(out, args.index)
    if args.list:
        for name, (a, what) in runs.items():
            print(f"{name:15s} {what}\n{'':15s} bench_{name}.py {' '.join(a) if a is not None else '(skipped)'}")
        return 0
    names = list(runs) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in runs]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(runs)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows, failed = [], 0
    for name in names:
        bench_args, what = runs[name]
        if bench_args is None:
            rows.append((name, "skipped", 0.0, what))
            print(f"== {name}: {what}", flush=True)
            continue
        cmd = [sys.executable, str(ROOT / "benchmarks" / f"bench_{name}.py"), *bench_args]
        log = out / f"{name}.log"
        print(f"== {name}: {' '.join(cmd[1:])}  (log: {log})", flush=True)
        t0 = time.perf_counter()
        try:
            with open(log, "w") as fh:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                    timeout=args.timeout).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout:.0f} s"
        secs = time.perf_counter() - t0
        if status != "ok":
            failed += 1
            tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
            print("\n".join("   " + line for line in tail), flush=True)
        rows.append((name, status, secs, what))
        print(f"   {status} in {secs:.0f} s", flush=True)
    print("\n| benchmark | status | seconds | what |\n|---|---|---:|---|")
    for name, status, secs, what in rows:
        print(f"| {name} | {status} | {secs:.0f} | {what} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
