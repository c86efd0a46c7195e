"""Which queries should the recall tuner measure on? Held-out rows vs indexed rows vs truly unseen queries.

``loupe optimize`` picks the cheapest ``efSearch`` whose recall@10 reaches the target, measured on a sample of
the collection's own vectors (:mod:`retrieval.index.tuning`). This script builds one HNSW32 graph
(efConstruction 80, as ``optimize`` does) over N ``bench_server.synthetic`` vectors **without** a sample of
``--sample`` rows, and reports recall@10 per efSearch of:

* held-out rows: the sample as queries, truth over the inserted vectors (what ``optimize`` measures);
* indexed rows, leave-one-out: ``--sample`` inserted rows as queries, their own row dropped (the cheap
  alternative: why it is not used for HNSW);
* unseen queries: ``--unseen`` fresh vectors of the same distribution (what users send).

    python benchmarks/bench_tuning.py --n 100000 --dim 128

Prints a Markdown table and a JSON line.
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

from bench_server import machine, synthetic  # noqa: E402

EF = (16, 32, 64, 96, 128, 192, 256, 320, 384, 512)


def main() -> int:
    import faiss

    from retrieval.index.optimize import HNSW_EF_CONSTRUCTION
    from retrieval.index.tuning import drop_own_rows, exact_neighbours, held_out_rows, recall_at_k

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--sample", type=int, default=1000, help="held-out rows (and indexed rows) used as queries")
    ap.add_argument("--unseen", type=int, default=500, help="fresh queries of the same distribution")
    args = ap.parse_args()

    vecs = synthetic(args.n, args.dim, np.random.default_rng(0))
    unseen = synthetic(args.unseen, args.dim, np.random.default_rng(99))
    held = held_out_rows(args.n, args.sample, seed=7)
    rest = np.setdiff1d(np.arange(args.n), held)
    t0 = time.perf_counter()
    index = faiss.index_factory(args.dim, "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    index.add(vecs[rest])
    build_s = time.perf_counter() - t0
    own = rest[np.random.default_rng(3).choice(len(rest), len(held), replace=False)]
    _, t_held = exact_neighbours([vecs], vecs[held], 10, exclude=held)
    _, t_unseen = exact_neighbours([vecs], unseen, 10, exclude=held)
    _, t_own = exact_neighbours([vecs], vecs[own], 11, exclude=held)
    t_own = drop_own_rows(t_own, own, 10)
    faiss.omp_set_num_threads(1)
    rows = []
    for ef in EF:
        index.hnsw.efSearch = ef
        r_held = recall_at_k(rest[index.search(vecs[held], 10)[1]], t_held)
        r_unseen = recall_at_k(rest[index.search(unseen, 10)[1]], t_unseen)
        r_own = recall_at_k(drop_own_rows(rest[index.search(vecs[own], 11)[1]], own, 10), t_own)
        rows.append({"efSearch": ef, "held_out": round(r_held, 4), "indexed_leave_one_out": round(r_own, 4),
                     "unseen": round(r_unseen, 4)})
    print(json.dumps({"n": args.n, "dim": args.dim, "sample": len(held), "unseen": args.unseen,
                      "build_s": round(build_s, 1), "rows": rows}))
    print(f"\nmachine: {machine()}; HNSW32 over {len(rest):,} of {args.n:,} vectors built in {build_s:.1f} s\n")
    print("| efSearch | " + " | ".join(str(r["efSearch"]) for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for key, label in (("held_out", "held-out rows"), ("indexed_leave_one_out", "indexed rows, leave-one-out"),
                       ("unseen", "unseen queries")):
        print(f"| {label} | " + " | ".join(f"{r[key]:.4f}" for r in rows) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
