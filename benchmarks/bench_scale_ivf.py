"""How much of the collection an IVF layout must scan on ``bench_server.synthetic`` data, whatever its codes.

An IVF index finds a neighbour only if the neighbour's list is among the ``nprobe`` probed ones. This
trains the coarse quantizer ``optimize`` would train (``IVF{nlist}`` with the inner-product metric, on a
sample), assigns every vector, and for held-out queries reports, per ``nprobe``: the share of the true top-10
whose lists are probed (the recall@10 an IVF-Flat index would reach, an upper bound for IVF-PQ with any
re-scoring factor) and the share of all vectors the probe scans. Cheap: no codes are computed.

    python benchmarks/bench_scale_ivf.py --n 1000000 --dim 128 --nlist 2048,4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_server import synthetic  # noqa: E402

NPROBES = (16, 32, 64, 96, 128, 192, 256, 384, 512)


def main() -> int:
    import faiss

    from retrieval.index.tuning import exact_neighbours, sample_rows

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--nlist", default="2048,4096")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--train-per-list", type=int, default=50, help="training sample = nlist x this")
    args = ap.parse_args()
    t = time.perf_counter()
    vecs = synthetic(args.n, args.dim, np.random.default_rng(0))
    queries = synthetic(args.queries, args.dim, np.random.default_rng(99))
    _, truth = exact_neighbours([vecs[a:a + 100_000] for a in range(0, args.n, 100_000)], queries, 10)
    print(f"data + truth {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    out = []
    for nlist in (int(x) for x in args.nlist.split(",")):
        t = time.perf_counter()
        index = faiss.index_factory(args.dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        sample = vecs[sample_rows(args.n, nlist * args.train_per_list, seed=1)]
        index.train(sample)
        quantizer = faiss.downcast_index(index.quantizer)
        train_s = time.perf_counter() - t
        _, assign = quantizer.search(vecs, 1)
        sizes = np.bincount(assign[:, 0], minlength=nlist)
        _, ranked = quantizer.search(queries, nlist)           # every list, best first, per query
        rank_of = np.empty_like(ranked)
        rank_of[np.arange(len(queries))[:, None], ranked] = np.arange(nlist)[None, :]
        truth_rank = rank_of[np.arange(len(queries))[:, None], assign[truth, 0]]
        rows = []
        for p in (p for p in NPROBES if p <= nlist):
            scanned = np.take_along_axis(sizes[None, :].repeat(len(queries), 0), ranked[:, :p], 1).sum(1)
            rows.append({"nprobe": p, "recall@10_upper": round(float((truth_rank < p).mean()), 4),
                         "scanned_share": round(float(np.median(scanned)) / args.n, 4)})
        res = {"n": args.n, "dim": args.dim, "nlist": nlist, "train_rows": len(sample), "train_s": round(train_s, 1),
               "list_size_p50_max": [int(np.median(sizes)), int(sizes.max())], "rows": rows}
        print(json.dumps(res), flush=True)
        out.append(res)
    for res in out:
        print(f"\nnlist {res['nlist']} (trained on {res['train_rows']:,}, {res['train_s']} s)\n"
              "| nprobe | recall@10 upper bound (IVF-Flat) | share of vectors scanned (median) |\n|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['nprobe']} | {r['recall@10_upper']:.4f} | {r['scanned_share']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
