"""Scale-up benchmark: query cost vs number of write shards, before and after `loupe optimize`.

For N synthetic clustered vectors (``bench_server.synthetic``: a low intrinsic dimension, like real
embeddings) written as 1, 10, 100 ... write shards (each its own HNSW or flat index, as `loupe index`
writes them), it measures on held-out queries (unseen samples of the same distribution):

* before: the engine fanning out over the write shards with the default parameters — recall@10, p50/p99;
* `optimize` (default flags, target recall 0.95): wall time, the layout and parameters it chose, the
  recall it measured on its own probe queries;
* after: the same queries through the layout — recall@10, p50/p99 on one thread and on all threads;
* bytes per vector on disk and resident after open, and a projection to 100M / 1B vectors.

    python benchmarks/bench_scale.py --n 100000 --dim 256 --shards 1,10,100 --write-type hnsw
    python benchmarks/bench_scale.py --n 20000 --dim 64 --shards 1,10 --quick      # seconds, for make bench

Appends nothing by itself: prints a Markdown report (copy it into RESULTS.md) and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import machine, pct, rss_mb, synthetic  # noqa: E402

from retrieval.index import (
    store,  # noqa: E402
    vector_files,
)


def write_shards(out: Path, vecs: np.ndarray, shards: int, write_type: str) -> float:
    """Write ``vecs`` as ``shards`` write shards of ``write_type`` (hnsw | flat); returns build seconds."""
    from indexer.index_types import new_index

    factory = "HNSW32,Flat" if write_type == "hnsw" else "Flat"
    n, dim = vecs.shape
    bounds = np.linspace(0, n, shards + 1).astype(int)
    entries, build = [], 0.0
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        t = time.perf_counter()
        index = new_index(factory, dim)
        index.add(vecs[a:b])
        build += time.perf_counter() - t
        name = store.shard_name(s)
        vector_files.write_vectors(out, "synthetic", name, index)
        store.write_metadata(out, name, [{"id": store.int_to_id(i), "source": f"s{i}"} for i in range(a, b)])
        entries.append(store.ShardEntry(name, int(b - a)))
    store.write_manifest(out, store.Manifest(
        encoders={"synthetic": store.EncoderEntry("synthetic", dim, index_type=write_type, factory=factory)},
        shards=entries))
    return build


def measure(engine, queries: np.ndarray, truth: np.ndarray, threads: int = 1) -> dict:
    import faiss

    from retrieval.index.tuning import recall_at_k

    faiss.omp_set_num_threads(threads)
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = engine.search_vector("synthetic", q, 10)
        lat.append(time.perf_counter() - t)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
        found.append(rows + [-1] * (10 - len(rows)))
    return {"recall@10": round(recall_at_k(np.array(found), truth, 10), 4), "p50_ms": round(pct(lat, 50) * 1e3, 3),
            "p99_ms": round(pct(lat, 99) * 1e3, 3)}


def disk_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def run(n: int, dim: int, shard_counts: list[int], write_type: str, nq: int, work: Path, threads_all: int) -> dict:
    import faiss

    from retrieval.engine.engine import Engine
    from retrieval.index.optimize import optimize
    from retrieval.index.tuning import exact_neighbours

    faiss.omp_set_num_threads(threads_all)
    vecs = synthetic(n, dim, np.random.default_rng(0))
    queries = synthetic(nq, dim, np.random.default_rng(99))
    _, truth = exact_neighbours([vecs], queries, 10)
    rows = []
    for shards in shard_counts:
        out = work / f"n{n}-s{shards}"
        shutil.rmtree(out, ignore_errors=True)
        faiss.omp_set_num_threads(threads_all)
        build = write_shards(out, vecs, shards, write_type)
        rss0 = rss_mb()
        before_engine = Engine(out, device="cpu")
        before = measure(before_engine, queries, truth)
        before_rss = rss_mb() - rss0
        before_engine.close()
        del before_engine
        faiss.omp_set_num_threads(threads_all)
        t = time.perf_counter()
        summary = optimize(out).encoders["synthetic"]
        opt_s = time.perf_counter() - t
        rss0 = rss_mb()
        engine = Engine(out, device="cpu")
        after_rss = rss_mb() - rss0
        after = measure(engine, queries, truth, threads=1)
        after_all = measure(engine, queries, truth, threads=threads_all)
        engine.close()
        row = {"n": n, "dim": dim, "write_shards": shards, "write_type": write_type, "build_s": round(build, 1),
               "before": before, "optimize_s": round(opt_s, 1), "layout": summary["layout"],
               "factory": summary["factory"], "params": summary["params"],
               "probe_recall@10": summary["recall@10"], "after_1_thread": after,
               f"after_{threads_all}_threads": after_all,
               "shard_bytes_per_vector": round(disk_bytes(out, "shard-*.faiss") / n, 1),
               "layout_bytes_per_vector": round(disk_bytes(out, "search-*.faiss") / n, 1),
               "rss_mb_before": round(before_rss, 1), "rss_mb_after": round(after_rss, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows}


def report(args, result: dict) -> str:
    rows = result["rows"]
    threads = args.threads
    lines = ["## Scale-up: write shards vs `loupe optimize` (`benchmarks/bench_scale.py`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}",
             f"- command: `python benchmarks/bench_scale.py --n {args.n} --dim {args.dim} --shards {args.shards} "
             f"--write-type {args.write_type} --queries {args.queries}`",
             f"- data: {args.n:,} synthetic clustered {args.dim}-d unit vectors; {args.queries} held-out queries "
             "(unseen samples of the same distribution); truth = exact inner-product top-10",
             "- before: the engine over the write shards with its defaults; after: `optimize()` with default flags "
             "(target recall@10 0.95), then the same queries; latency = one query at a time", "",
             f"| write shards | before recall@10 | before p50 / p99 ms | optimize s | layout, params | probe recall | "
             f"after recall@10 | after p50 / p99 ms (1 thread) | after p50 ms ({threads} threads) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, aa = r["before"], r["after_1_thread"], r[f"after_{threads}_threads"]
        lines.append(f"| {r['write_shards']} ({r['write_type']}) | {b['recall@10']:.4f} | {b['p50_ms']:.2f} / "
                     f"{b['p99_ms']:.2f} | {r['optimize_s']:.1f} | {r['factory']} {r['params'] or 'exact'} | "
                     f"{r['probe_recall@10']:.4f} | {a['recall@10']:.4f} | {a['p50_ms']:.2f} / {a['p99_ms']:.2f} | "
                     f"{aa['p50_ms']:.2f} |")
    p50 = [r["after_1_thread"]["p50_ms"] for r in rows]
    if len(p50) > 1:
        lines += ["", f"- after optimize, p50 across write-shard counts: max/min = {max(p50) / min(p50):.2f} "
                      "(goal ≤ 1.2)"]
    r = rows[-1]
    per_vec = r["layout_bytes_per_vector"] + r["shard_bytes_per_vector"]
    lines += [f"- bytes per vector on disk: write shards {r['shard_bytes_per_vector']}, layout "
              f"{r['layout_bytes_per_vector']}; resident after open: {r['rss_mb_after'] * 2**20 / args.n:.0f} B/vector",
              f"- projection from these per-vector figures: 100M vectors ≈ {per_vec * 1e8 / 2**30:.0f} GiB on disk, "
              f"1B ≈ {per_vec * 1e9 / 2**30:.0f} GiB (HNSW + float32 shards; IVF-PQ layouts are ~{args.dim // 8 + 8} "
              "B/vector plus the shards used for re-scoring)", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", default="1,10,100", help="write-shard counts, comma-separated")
    ap.add_argument("--write-type", choices=("hnsw", "flat"), default="hnsw")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--quick", action="store_true", help="20,000 x 64-d, 1 and 10 shards, 200 queries")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.shards, args.queries = 20_000, 64, "1,10", 200
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loupe-scale-"))
    try:
        result = run(args.n, args.dim, [int(s) for s in args.shards.split(",")], args.write_type, args.queries,
                     work, args.threads)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(report(args, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
