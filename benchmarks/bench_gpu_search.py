"""GPU vs CPU search and GPU dedup at 1M, through Loupe's own code paths (issue 14, item 4).

For ``--n`` synthetic clustered ``--dim``-d vectors (``bench_server.synthetic``) plus ``--planted``
near-duplicates, written as ``--shards`` flat write shards (as ``loupe index`` writes them):

* CPU exact: faiss ``IndexFlatIP`` over all rows on every core, a batch of ``--queries`` (the truth), and
  the engine's own CPU fan-out over the write shards one query at a time (``Engine(device="cpu")``);
* GPU exact: the engine with ``device="cuda"`` (torch float16 matmul + top-k, float32 re-scoring of the
  candidates: ``retrieval/index/torch_search.py``) one query at a time through ``Engine.search_vector``,
  and batches of 1,000 / 4,096 through the same searcher; answers compared with the CPU's (same ids);
* with ``--layout ivfpq`` (or ``ivfpq-pca``): ``loupe optimize`` builds that layout, searched through the
  engine on the CPU and, when the installed faiss has GPU support (the ``gpu`` extra), through its faiss GPU
  copy (``retrieval/index/faiss_gpu.py``), one query at a time and in a batch: latency, recall against the
  truth, and whether the two answer alike;
* ``loupe dedup --device cuda --candidates index --check none`` on the whole collection (a subprocess:
  wall time, peak RSS), planted pairs found, and the pairs on a subset checked against exact range search.

    PYTHONPATH=. python3 benchmarks/bench_gpu_search.py --n 1000000 --dim 512 --planted 10000 --out $OUT/gs.json

Prints a JSON object per stage and a Markdown table at the end (for RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import with_planted, write_shards  # noqa: E402
from bench_server import machine, pct, synthetic  # noqa: E402


def log(stage: str, **row) -> dict:
    print(json.dumps({"stage": stage, **row}), flush=True)
    return row


def one_at_a_time(engine, queries: np.ndarray, k: int) -> tuple[list[float], np.ndarray]:
    """Per-query latency (s) and global rows of ``Engine.search_vector`` (the product path)."""
    lat, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = engine.search_vector("synthetic", q, k)
        lat.append(time.perf_counter() - t)
        rows = [int(engine.records.offsets[h.shard]) + h.row for h in hits]
        found.append(rows + [-1] * (k - len(rows)))
    return lat, np.array(found)


def batched(search, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``search(queries, k)`` over ``repeats`` runs (after one warm-up) and its rows."""
    rows = search(queries, k)[1]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        search(queries, k)
        times.append(time.perf_counter() - t)
    return float(np.median(times)), rows


def same_rows(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of queries whose top-k row lists are identical."""
    return float(np.mean([np.array_equal(x, y) for x, y in zip(a, b)]))


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    from retrieval.index.tuning import recall_at_k

    return round(recall_at_k(found[:, :10], truth[:, :10], 10), 4)


def layout_stage(out: Path, args, queries: np.ndarray, truth: np.ndarray, single: np.ndarray) -> dict:
    """The optimized IVF-PQ layout through the CPU engine, then through its faiss GPU copy (same engine)."""
    from retrieval.device import faiss_gpu_available
    from retrieval.engine.engine import Engine
    from retrieval.index.faiss_gpu import layout_to_gpu
    from retrieval.index.optimize import optimize

    t = time.perf_counter()
    info = optimize(out, layout=args.layout).encoders["synthetic"]
    row = {"layout": info["layout"], "factory": info["factory"], "params": info.get("params"),
           "optimize_s": round(time.perf_counter() - t, 1)}
    engine = Engine(out, device="cpu")
    layout = engine.shards.layouts["synthetic"]
    answers = {}
    for where in ("cpu", "gpu"):
        if where == "gpu":
            if not faiss_gpu_available():
                row["gpu"] = "the installed faiss has no GPU support (install the gpu extra)"
                break
            layout.gpu = layout_to_gpu(layout, args.device)
        one_at_a_time(engine, single[:20], 10)                  # warm-up
        lat, found = one_at_a_time(engine, single, 10)
        s, rows = batched(lambda q, k: layout.search(q, k), queries, 10, max(1, args.repeats // 2))
        answers[where] = found
        row[where] = {"p50_ms": round(pct(lat, 50) * 1e3, 3), "p99_ms": round(pct(lat, 99) * 1e3, 3),
                      "recall_at_10": recall(found, truth[:len(found)]), "batch_qps": round(len(queries) / s, 1),
                      "batch_recall_at_10": recall(rows, truth)}
    if len(answers) == 2:
        row["gpu_same_rows_as_cpu"] = same_rows(answers["gpu"], answers["cpu"])
    engine.close()
    return log("layout", **row)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors before the planted copies")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--planted", type=int, default=10_000, help="near-duplicates appended (cosine ~0.995)")
    ap.add_argument("--shards", type=int, default=10, help="flat write shards")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--single", type=int, default=300, help="queries sent one at a time to the GPU engine")
    ap.add_argument("--single-cpu", type=int, default=100, help="... and to the CPU engine (a full scan each)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dedup-k", type=int, default=16)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--subset", type=int, default=20_000, help="rows checked against exact range search")
    ap.add_argument("--skip-dedup", action="store_true")
    ap.add_argument("--layout", default=None, help="also optimize to this IVF-PQ layout and search it on CPU and GPU")
    ap.add_argument("--device", default="cuda", help="cuda[:N]; torch-cpu runs the same path on the CPU (a dry run)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None, help="write the JSON summary here")
    args = ap.parse_args()

    import faiss
    import torch

    from retrieval.engine.engine import Engine

    work = Path(args.work or tempfile.mkdtemp(prefix="gpu-search-"))
    out = work / "index"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    result: dict = {"machine": machine(), "gpu": gpu, "torch": torch.__version__, "faiss": faiss.__version__,
                    "args": vars(args)}
    log("start", **result)

    t = time.perf_counter()
    vecs = synthetic(args.n, args.dim, np.random.default_rng(0))
    vecs, pairs = with_planted(vecs, args.planted, np.random.default_rng(5))
    queries = synthetic(args.queries, args.dim, np.random.default_rng(99))
    result["data_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    write_shards(out, vecs, args.shards, "flat")
    np.save(out / "planted-pairs.npy", pairs)
    result["write_s"] = round(time.perf_counter() - t, 1)
    log("data", n=len(vecs), data_s=result["data_s"], write_s=result["write_s"])

    # -- CPU: faiss exact over everything, all cores (the truth and the batch baseline) -------------
    threads = os.cpu_count() or 1
    faiss.omp_set_num_threads(threads)
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(vecs)
    cpu_s, truth = batched(flat.search, queries, 10, max(1, args.repeats // 2))
    _, truth17 = flat.search(queries[:200], args.dedup_k + 1)
    result["cpu_faiss_flat_batch"] = log("cpu-batch", queries=len(queries), threads=threads, median_s=round(cpu_s, 4),
                                         qps=round(len(queries) / cpu_s, 1))
    single = queries[:args.single]
    cpu_engine = Engine(out, device="cpu")
    lat, found = one_at_a_time(cpu_engine, single[:args.single_cpu], 10)
    cpu_engine.close()
    result["cpu_engine_single"] = log("cpu-single", queries=len(found), threads=threads,
                                      p50_ms=round(pct(lat, 50) * 1e3, 3), p99_ms=round(pct(lat, 99) * 1e3, 3),
                                      qps=round(len(found) / sum(lat), 1),
                                      recall_at_10=recall(found, truth[:len(found)]),
                                      same_rows=same_rows(found, truth[:len(found)]))
    del flat

    # -- GPU: the engine with device cuda ------------------------------------------------------------
    t = time.perf_counter()
    cuda = args.device.startswith("cuda")
    engine = Engine(out, device=args.device) if cuda else Engine(out, device="cpu", search_device=args.device)
    acc = engine.shards.accelerated.get("synthetic")
    result["gpu_open_s"] = round(time.perf_counter() - t, 2)
    if acc is None:
        log("gpu", error=f"the engine did not put the vectors on {args.device}")
        return 1
    lat, found = one_at_a_time(engine, single, 10)          # warm-up (CUDA start, kernels)
    lat, found = one_at_a_time(engine, single, 10)
    result["gpu_engine_single"] = log("gpu-single", queries=len(single), open_s=result["gpu_open_s"],
                                      matrix_mb=round(acc.nbytes / 2**20), p50_ms=round(pct(lat, 50) * 1e3, 3),
                                      p99_ms=round(pct(lat, 99) * 1e3, 3), qps=round(len(single) / sum(lat), 1),
                                      recall_at_10=recall(found, truth[:len(found)]),
                                      same_rows=same_rows(found, truth[:len(single)]))
    for nq in (len(queries), 4096):
        q = queries if nq == len(queries) else synthetic(nq, args.dim, np.random.default_rng(7))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        s, rows = batched(acc.search, q, 10, args.repeats)
        row = {"queries": nq, "float16": acc.half, "median_s": round(s, 4), "qps": round(nq / s, 1),
               "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None}
        if nq == len(queries):
            row.update(recall_at_10=recall(rows, truth), same_rows=same_rows(rows, truth))
        result[f"gpu_batch_{nq}"] = log("gpu-batch", **row)
    rows17 = acc.search(queries[:200], args.dedup_k + 1)[1]
    result["gpu_same_rows_k17"] = log("gpu-k17", same_rows=same_rows(rows17, truth17), float16=acc.half)
    # the other precision, for comparison: a float16 copy re-scored on the CPU from the stored vectors
    from retrieval.index.torch_search import TorchFlatSearcher

    other = TorchFlatSearcher([v for _, v, _ in engine.all_vectors("synthetic")], str(acc.device), half=not acc.half,
                              exact_vectors=partial(engine.shards.vectors_at, "synthetic"))
    for nq in (len(queries), 4096):
        q = queries if nq == len(queries) else synthetic(nq, args.dim, np.random.default_rng(7))
        s, rows = batched(other.search, q, 10, args.repeats)
        row = {"queries": nq, "float16": other.half, "median_s": round(s, 4), "qps": round(nq / s, 1)}
        if nq == len(queries):
            row.update(recall_at_10=recall(rows, truth), same_rows=same_rows(rows, truth))
        result[f"gpu_other_batch_{nq}"] = log("gpu-other-precision", **row)
    del other
    engine.close()
    del engine, acc
    if cuda:
        torch.cuda.empty_cache()

    if args.layout:
        result["layout"] = layout_stage(out, args, queries, truth, single)

    # -- dedup on the GPU: the CLI, as a user runs it ------------------------------------------------
    if not args.skip_dedup:
        del vecs
        cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_dedup.py"), "scale", "--index", str(out),
               "--device", args.device, "-k", str(args.dedup_k), "--threshold", str(args.threshold),
               "--subset", str(args.subset), "--work", str(work / "dedup")]
        t = time.perf_counter()
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        result["dedup"] = log("dedup", rc=run.returncode, wall_s=round(time.perf_counter() - t, 1),
                              report=run.stdout[-3000:], stderr=run.stderr[-2000:])
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    c, g = result["cpu_faiss_flat_batch"], result[f"gpu_batch_{len(queries)}"]
    cs, gs = result["cpu_engine_single"], result["gpu_engine_single"]
    copy = "float16 copy, re-scored on the CPU" if g["float16"] else "float32 copy, re-scored on the GPU"
    print(f"\n| search, exact, k=10 | CPU (faiss, {threads} threads) | GPU ({gpu}, torch, {copy}) | ratio |")
    print("|---|---|---|---|")
    print(f"| batch of {len(queries)}: queries/s | {c['qps']:,} | {g['qps']:,} | {g['qps'] / c['qps']:.1f}x |")
    print(f"| one at a time (Engine.search_vector): p50 ms | {cs['p50_ms']} | {gs['p50_ms']} | "
          f"{cs['p50_ms'] / gs['p50_ms']:.1f}x |")
    print(f"| same top-10 rows as faiss exact | {cs['same_rows']} | {g['same_rows']} | |")
    o = result[f"gpu_other_batch_{len(queries)}"]
    print(f"| batch of {len(queries)}, the other GPU copy (float16={o['float16']}): queries/s | | {o['qps']:,} | "
          f"{o['qps'] / c['qps']:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
