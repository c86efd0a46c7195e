"""Scale-up benchmark: query cost vs number of write shards, before and after `loupe optimize`.

For N synthetic clustered vectors (``bench_server.synthetic``: a low intrinsic dimension, like real
embeddings) written as 1, 10, 100 ... write shards (each its own HNSW or flat index, as `loupe index`
writes them), it measures on held-out queries (unseen samples of the same distribution):

* before: the engine fanning out over the write shards with the default parameters — recall@10, p50/p99;
* `optimize` (default flags, target recall 0.95): wall time, the layout and parameters it chose, the
  recall it measured on its own held-out (HNSW) or leave-one-out (IVF) sample;
* after: the same queries through the layout — recall@10, p50/p99 on one thread and on all threads;
* bytes per vector on disk and resident after open, and a projection to 100M / 1B vectors.

    python benchmarks/bench_scale.py --n 100000 --dim 256 --shards 1,10,100 --write-type hnsw
    python benchmarks/bench_scale.py --n 20000 --dim 64 --shards 1,10 --quick      # seconds, for make bench
    python benchmarks/bench_scale.py --n 10000000 --dim 512 --shards 100 --write-type flat --skip-before --stream

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

from bench_server import machine, pct, rss_mb, synthetic, synthetic_blocks  # noqa: E402

from retrieval.index import (
    store,  # noqa: E402
    vector_files,
)
from retrieval.index.optimize import LAYOUT_TYPES  # noqa: E402


def write_shards(out: Path, vecs, shards: int, write_type: str, *, n: int | None = None, dim: int | None = None
                 ) -> float:
    """Write ``vecs`` as ``shards`` write shards of ``write_type`` (hnsw | flat); returns build seconds.
    ``vecs``: an array, or (``--stream``) an iterable of consecutive blocks of ``n`` x ``dim`` in all."""
    from indexer.index_types import new_index

    factory = "HNSW32,Flat" if write_type == "hnsw" else "Flat"
    if isinstance(vecs, np.ndarray):
        n, dim = vecs.shape
    bounds = np.linspace(0, n, shards + 1).astype(int)
    blocks = _rechunk(vecs, np.diff(bounds)) if not isinstance(vecs, np.ndarray) else None
    entries, build = [], 0.0
    for s in range(shards):
        a, b = bounds[s], bounds[s + 1]
        part = vecs[a:b] if blocks is None else next(blocks)
        t = time.perf_counter()
        index = new_index(factory, dim)
        index.add(part)
        build += time.perf_counter() - t
        del part
        name = store.shard_name(s)
        vector_files.write_vectors(out, "synthetic", name, index)
        store.write_metadata(out, name, [{"id": store.int_to_id(i), "source": f"s{i}"} for i in range(a, b)])
        entries.append(store.ShardEntry(name, int(b - a)))
    store.write_manifest(out, store.Manifest(
        encoders={"synthetic": store.EncoderEntry("synthetic", dim, index_type=write_type, factory=factory)},
        shards=entries))
    return build


def _rechunk(blocks, sizes):
    """Consecutive blocks regrouped into pieces of ``sizes`` rows."""
    it, buf = iter(blocks), []
    for size in sizes:
        have = sum(len(x) for x in buf)
        while have < size:
            buf.append(next(it))
            have += len(buf[-1])
        joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
        yield joined[:size]
        buf = [joined[size:]] if have > size else []


def stored_blocks(out: Path):
    """Each written shard's vectors in order, read back (memory-mapped) one at a time."""
    manifest = store.read_manifest(out)
    for shard in manifest.shards:
        index = vector_files.read_vectors(out, "synthetic", shard.name)
        yield vector_files.reconstruct_all(index)
        del index


def measure(engine, queries: np.ndarray, truth: np.ndarray, threads: int = 1, params: dict | None = None) -> dict:
    import faiss

    from retrieval.index.tuning import recall_at_k

    faiss.omp_set_num_threads(threads)
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = engine.search_vector("synthetic", q, 10, params=params)
        lat.append(time.perf_counter() - t)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
        found.append(rows + [-1] * (10 - len(rows)))
    return {"recall@10": round(recall_at_k(np.array(found), truth, 10), 4), "p50_ms": round(pct(lat, 50) * 1e3, 3),
            "p99_ms": round(pct(lat, 99) * 1e3, 3)}


def disk_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def with_planted(vecs: np.ndarray, planted: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Append ``planted`` near-duplicates (cosine ~0.99 to a random original); returns (vectors, [m, 2] pairs
    of rows (original, copy))."""
    if not planted:
        return vecs, np.zeros((0, 2), np.int64)
    n, dim = vecs.shape
    orig = np.sort(rng.choice(n, planted, replace=False))
    copies = vecs[orig] + 0.1 * rng.standard_normal((planted, dim)).astype(np.float32) / np.sqrt(dim)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    pairs = np.stack([orig, np.arange(n, n + planted)], axis=1).astype(np.int64)
    return np.concatenate([vecs, copies.astype(np.float32)]), pairs


def optimize_one(out: Path, layout: str, threads_all: int) -> tuple[dict, float, float]:
    """``optimize`` with default flags (but ``layout``); (summary, seconds, peak RSS MB growth)."""
    import faiss

    from retrieval.index.optimize import optimize

    faiss.omp_set_num_threads(threads_all)
    rss0 = rss_mb()
    t = time.perf_counter()
    summary = optimize(out, layout=layout).encoders["synthetic"]
    return summary, time.perf_counter() - t, peak_rss_mb() - rss0


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(n: int, dim: int, shard_counts: list[int], write_type: str, nq: int, work: Path, threads_all: int, *,
        layout: str = "auto", skip_before: bool = False, planted: int = 0, keep: bool = False,
        repeats: int = 0, stream: bool = False) -> dict:
    import faiss

    from retrieval.engine.engine import Engine
    from retrieval.index.tuning import exact_neighbours

    faiss.omp_set_num_threads(threads_all)
    t = time.perf_counter()
    queries = synthetic(nq, dim, np.random.default_rng(99))
    if stream:          # never held whole: written shard by shard, the truth computed in the same pass
        if planted or len(shard_counts) != 1:
            raise SystemExit("--stream builds one index (one --shards value) without --planted")
        vecs, pairs = None, np.zeros((0, 2), np.int64)
    else:
        vecs = synthetic(n, dim, np.random.default_rng(0))
        vecs, pairs = with_planted(vecs, planted, np.random.default_rng(5))
        n = len(vecs)
        _, truth = exact_neighbours([vecs[a:a + 100_000] for a in range(0, n, 100_000)], queries, 10)
        print(f"data + truth: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    rows, dirs = [], []
    for shards in shard_counts:
        out = work / f"n{n}-s{shards}"
        shutil.rmtree(out, ignore_errors=True)
        faiss.omp_set_num_threads(threads_all)
        if stream:
            t = time.perf_counter()
            build = write_shards(out, synthetic_blocks(n, dim, np.random.default_rng(0)), shards, write_type,
                                 n=n, dim=dim)
            _, truth = exact_neighbours(stored_blocks(out), queries, 10)
            print(f"data + shards + truth: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
        else:
            build = write_shards(out, vecs, shards, write_type)
        if planted:
            np.save(out / "planted-pairs.npy", pairs)
        before, before_rss = None, None
        if not skip_before:
            rss0 = rss_mb()
            before_engine = Engine(out, device="cpu")
            before = measure(before_engine, queries, truth)
            before_rss = rss_mb() - rss0
            before_engine.close()
            del before_engine
        summary, opt_s, opt_peak = optimize_one(out, layout, threads_all)
        rss0 = rss_mb()
        t_open = time.perf_counter()
        engine = Engine(out, device="cpu")
        open_s = time.perf_counter() - t_open        # page cache as optimize left it
        after_rss = rss_mb() - rss0
        after = measure(engine, queries, truth, threads=1)
        after_all = measure(engine, queries, truth, threads=threads_all)
        engine.close()
        del engine
        row = {"n": n, "dim": dim, "write_shards": shards, "write_type": write_type, "build_s": round(build, 1),
               "before": before, "optimize_s": round(opt_s, 1), "optimize_peak_rss_growth_mb": round(opt_peak, 1),
               "layout": summary["layout"], "factory": summary["factory"], "params": summary["params"],
               "tuned_recall@10": summary["recall@10"], "after_1_thread": after,
               f"after_{threads_all}_threads": after_all,
               "shard_bytes_per_vector": round(disk_bytes(out, "shard-*.faiss") / n, 1),
               "layout_bytes_per_vector": round((disk_bytes(out, "search-*.faiss")
                                                 + disk_bytes(out, "search-*.ivfdata")) / n, 1),
               "layout_files": {p.name: p.stat().st_size for p in out.rglob("search-*")},
               "rss_mb_before": None if before_rss is None else round(before_rss, 1),
               "rss_mb_after": round(after_rss, 1), "open_s": round(open_s, 2)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        dirs.append(out)
    fixed = interleaved(dirs, queries, truth, rows[0]["params"], repeats) if repeats and len(dirs) > 1 else None
    if not keep:
        for out in dirs:
            shutil.rmtree(out, ignore_errors=True)
    return {"rows": rows, "fixed": fixed, "dirs": [str(d) for d in dirs]}


def interleaved(dirs: list[Path], queries: np.ndarray, truth: np.ndarray, params: dict, repeats: int) -> dict:
    """Latency of every layout with the same ``params`` (the first one's tuned parameters), one thread, in
    ``repeats`` rounds that visit the layouts in a rotated order; per layout the median of the rounds' p50."""
    import faiss

    from retrieval.engine.engine import Engine

    faiss.omp_set_num_threads(1)
    engines = [Engine(d, device="cpu") for d in dirs]
    for engine in engines:                       # warm: page cache, lazy structures
        measure(engine, queries[:50], truth[:50], params=params)
    p50s: list[list[float]] = [[] for _ in dirs]
    recall = [0.0] * len(dirs)
    for r in range(repeats):
        order = [(r + j) % len(dirs) for j in range(len(dirs))]
        for j in order:
            m = measure(engines[j], queries, truth, params=params)
            p50s[j].append(m["p50_ms"])
            recall[j] = m["recall@10"]
    for engine in engines:
        engine.close()
    med = [float(np.median(x)) for x in p50s]
    return {"params": params, "repeats": repeats, "median_p50_ms": med, "p50_runs": p50s, "recall@10": recall,
            "max_over_min": round(max(med) / min(med), 3)}


def report(args, result: dict) -> str:
    rows = result["rows"]
    threads = args.threads
    lines = ["## Scale-up: write shards vs `loupe optimize` (`benchmarks/bench_scale.py`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine: {machine()}; "
             f"load average {os.getloadavg()[0]:.1f}",
             f"- command: `python {' '.join(sys.argv)}`",
             f"- data: {rows[0]['n']:,} synthetic clustered {args.dim}-d unit vectors ({args.planted} of them planted "
             f"near-duplicates); {args.queries} held-out queries (unseen samples of the same distribution); "
             "truth = exact inner-product top-10",
             f"- before: the engine over the write shards with its defaults; after: "
             f"`optimize(layout={args.layout!r})`, "
             "otherwise default flags (target recall@10 0.95), then the same queries; latency = one query at a time",
             "",
             f"| write shards | before recall@10 | before p50 / p99 ms | optimize s | layout, params | tuned recall | "
             f"after recall@10 | after p50 / p99 ms (1 thread) | after p50 / p99 ms ({threads} threads) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a, aa = r["before"], r["after_1_thread"], r[f"after_{threads}_threads"]
        before = (f"{b['recall@10']:.4f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f}" if b else "not measured | —")
        lines.append(f"| {r['write_shards']} ({r['write_type']}) | {before} | {r['optimize_s']:.1f} | "
                     f"{r['factory']} {r['params'] or 'exact'} | {r['tuned_recall@10']:.4f} | {a['recall@10']:.4f} | "
                     f"{a['p50_ms']:.3f} / {a['p99_ms']:.3f} | {aa['p50_ms']:.3f} / {aa['p99_ms']:.3f} |")
    fixed = result.get("fixed")
    if fixed:
        lines += ["", f"- same parameters {fixed['params']} on every layout, {fixed['repeats']} interleaved rounds, "
                      f"1 thread: median p50 = {', '.join(f'{x:.3f}' for x in fixed['median_p50_ms'])} ms; "
                      f"max/min = {fixed['max_over_min']} (goal ≤ 1.2); recall@10 "
                      f"{', '.join(f'{x:.4f}' for x in fixed['recall@10'])}"]
    r = rows[-1]
    n = r["n"]
    disk = r["layout_bytes_per_vector"] + r["shard_bytes_per_vector"]
    ram = r["rss_mb_after"] * 2**20 / n
    lines += ["", f"- bytes per vector on disk: write shards {r['shard_bytes_per_vector']}, layout "
                  f"{r['layout_bytes_per_vector']} ({r['layout_files']}); resident after open: {ram:.1f} B/vector "
                  f"(write shards covered by the layout are mapped; `bench_scale_measure.py` splits anonymous and "
                  f"mapped pages); optimize peak RSS growth "
                  f"{r['optimize_peak_rss_growth_mb']} MB",
              "", "| vectors | disk (layout + write shards) | disk (layout only) | RAM after open (as measured) |",
              "|---|---|---|---|"]
    for total in (1e8, 1e9):
        lines.append(f"| {total:,.0f} | {disk * total / 2**30:,.1f} GiB | "
                     f"{r['layout_bytes_per_vector'] * total / 2**30:,.1f} GiB | {ram * total / 2**30:,.1f} GiB |")
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--shards", default="1,10,100", help="write-shard counts, comma-separated")
    ap.add_argument("--write-type", choices=("hnsw", "flat"), default="hnsw")
    ap.add_argument("--layout", choices=LAYOUT_TYPES, default="auto",
                    help="the layout optimize builds (auto = the default flags)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--skip-before", action="store_true", help="do not measure the fan-out over write shards")
    ap.add_argument("--planted", type=int, default=0, help="append this many near-duplicates (for bench_dedup scale)")
    ap.add_argument("--repeats", type=int, default=0,
                    help="also time every layout with the same parameters in this many interleaved rounds")
    ap.add_argument("--stream", action="store_true",
                    help="never hold the vectors whole (collections larger than RAM): generated and written shard "
                         "by shard, the truth read back from the shards; one --shards value, no --planted")
    ap.add_argument("--quick", action="store_true", help="20,000 x 64-d, 1 and 10 shards, 200 queries")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the indexes under --work")
    args = ap.parse_args()
    if args.quick:
        args.n, args.dim, args.shards, args.queries = 20_000, 64, "1,10", 200
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="loupe-scale-"))
    try:
        result = run(args.n, args.dim, [int(s) for s in args.shards.split(",")], args.write_type, args.queries,
                     work, args.threads, layout=args.layout, skip_before=args.skip_before, planted=args.planted,
                     keep=args.keep and bool(args.work), repeats=args.repeats,
                     stream=args.stream)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    print(report(args, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
