"""Re-measure an optimized index kept by ``bench_scale.py --keep``: latency at normal priority, resident memory.

``bench_scale.py`` builds, optimizes and measures in one (long, often ``nice``-d) process; this one opens
the kept index again and measures only what is read:

* recall@10 and p50/p99 (one query at a time) on the same held-out queries (``bench_server.synthetic``,
  seed 99), on 1 thread and on all threads, in ``--rounds`` rounds; medians of the rounds' p50/p99;
* resident memory of opening the engine, each in a fresh child process: ``VmRSS`` growth split into
  anonymous (private, the process's own) and file-backed (mapped pages of the page cache, dropped by the
  kernel under memory pressure), once as Loupe opens it now (write shards covered by the layout mapped)
  and once with every write shard under 512 MiB read into RAM (how it opened them before), after a
  warm-up of ``--queries`` searches.

    python benchmarks/bench_scale_measure.py /tmp/w/n1000000-s10 --dim 128 --queries 500 --rounds 3

Prints a JSON line and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_server import pct, synthetic  # noqa: E402

ENCODER = "synthetic"


def rss_parts() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile of this process, MB."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def truth_for(index_dir: Path, queries: np.ndarray) -> np.ndarray:
    from retrieval.engine.engine import Engine
    from retrieval.index.tuning import exact_neighbours

    engine = Engine(index_dir, device="cpu")
    _, truth = exact_neighbours((v for _, v, _ in engine.shards.all_vectors(ENCODER)), queries, 10)
    engine.close()
    return truth


def latency(index_dir: Path, queries: np.ndarray, truth: np.ndarray, threads: int, rounds: int,
            params: dict | None = None) -> dict:
    import faiss

    from retrieval.engine.engine import Engine
    from retrieval.index.tuning import recall_at_k

    engine = Engine(index_dir, device="cpu")
    faiss.omp_set_num_threads(threads)
    for q in queries[:50]:                                 # warm-up: page cache, lazy structures
        engine.search_vector(ENCODER, q, 10, params=params)
    p50, p99, recall, loads = [], [], 0.0, []
    for _ in range(rounds):
        lat, found = [], []
        loads.append(os.getloadavg()[0])
        for q in queries:
            t = time.perf_counter()
            hits = engine.search_vector(ENCODER, q, 10, params=params)
            lat.append(time.perf_counter() - t)
            rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
            found.append(rows + [-1] * (10 - len(rows)))
        p50.append(pct(lat, 50) * 1e3)
        p99.append(pct(lat, 99) * 1e3)
        recall = recall_at_k(np.array(found), truth, 10)
    engine.close()
    return {"threads": threads, "params": params or "tuned", "recall@10": round(recall, 4),
            "p50_ms_rounds": [round(x, 3) for x in p50],
            "p99_ms_rounds": [round(x, 3) for x in p99], "p50_ms": round(float(np.median(p50)), 3),
            "p99_ms": round(float(np.median(p99)), 3), "load_avg": [round(x, 2) for x in loads]}


_RESIDENT = """
import json, sys
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/benchmarks"]
import numpy as np
from bench_scale_measure import rss_parts, ENCODER
from bench_server import synthetic
from retrieval.engine.engine import Engine
if sys.argv[3] == "read":            # before: write shards under 512 MiB read into RAM even when covered
    import retrieval.index.layout as layout
    layout.covered_shards = lambda manifest, encoder: set()
queries = synthetic(int(sys.argv[4]), int(sys.argv[5]), np.random.default_rng(99))
import faiss
faiss.omp_set_num_threads(1)
r0 = rss_parts()
engine = Engine(sys.argv[1], device="cpu")
r1 = rss_parts()
for q in queries:
    engine.search_vector(ENCODER, q, 10)
r2 = rss_parts()
print(json.dumps({"mode": sys.argv[3], "mapped_shards": len(engine.shards._mapped),
                  "open": {k: r1[k] - r0[k] for k in r0}, "after_queries": {k: r2[k] - r0[k] for k in r0}}))
"""


def resident(index_dir: Path, mode: str, nq: int, dim: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RESIDENT, str(index_dir), str(ROOT), mode, str(nq), str(dim)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index_dir")
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-resident", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--params", action="append", default=[],
                    help='search parameters to time besides the tuned ones, JSON (e.g. \'{"efSearch": 256}\')')
    args = ap.parse_args()
    index_dir = Path(args.index_dir)
    from retrieval.index import store

    n = store.read_manifest(index_dir).count
    out: dict = {"index": str(index_dir), "n": n, "dim": args.dim, "queries": args.queries,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if not args.skip_resident:
        for mode in ("read", "mapped"):
            r = resident(index_dir, mode, args.queries, args.dim)
            r["bytes_per_vector"] = {k: round(v * 2**20 / n, 1) for k, v in r["after_queries"].items()}
            out[f"resident_{mode}"] = r
            print(json.dumps(r), file=sys.stderr, flush=True)
    if not args.skip_latency:
        queries = synthetic(args.queries, args.dim, np.random.default_rng(99))
        truth = truth_for(index_dir, queries)
        out["latency"] = [latency(index_dir, queries, truth, t, args.rounds) for t in sorted({1, args.threads})]
        out["latency"] += [latency(index_dir, queries, truth, 1, args.rounds, json.loads(p)) for p in args.params]
    print(json.dumps(out))
    for lat in out.get("latency", []):
        print(f"| {lat['params']} | {lat['threads']} | {lat['recall@10']:.4f} | "
              f"{lat['p50_ms']:.3f} / {lat['p99_ms']:.3f} | "
              f"{', '.join(map(str, lat['p50_ms_rounds']))} | {lat['load_avg']} |")
    for mode in ("read", "mapped"):
        r = out.get(f"resident_{mode}")
        if r:
            cells = [f"{r['after_queries'][k]:.1f} MB ({r['bytes_per_vector'][k]} B/vec)"
                     for k in ("VmRSS", "RssAnon", "RssFile")]
            print(f"| {mode} | {r['mapped_shards']} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
