"""`loupe optimize`: one searchable index per encoder over every shard, with recall-targeted parameters."""

from __future__ import annotations

import json
import sys

DESCRIPTION = """Build one searchable index per encoder from the index's write shards, so a query's cost no
longer grows with the number of shards, and pick its search parameters by measurement.

Layout (--layout auto): exact (flat) up to 50,000 images, HNSW up to 5,000,000 when it fits the memory
budget (from 500,000 images of >= 256 dimensions: hnsw-pca, the graph on a 128-d PCA projection, the best
candidates re-scored exactly from the stored vectors), IVF-PQ beyond (compressed codes, re-scored the same way):
ivfpq-fastscan when its 4-bit codes fit half the memory budget in RAM (72 bytes a vector; scanned with SIMD fast-scan
kernels, from 256 dimensions on an uncentred 128-d PCA projection that keeps inner products), else ivfpq-pca
(8-bit codes on that projection) or ivfpq, their lists on disk, memory-mapped.
Then recall@10 is measured against exact search on a sample of the index's own vectors used as queries it
has not seen (HNSW: held out of the graph while measuring, inserted after; IVF: each leaves itself out),
and the cheapest efSearch / nprobe (and refine factor) that reaches --target-recall is recorded in the
manifest; searches use it unless a request passes its own "params". The manifest switches atomically:
searches (and `loupe serve`) keep working during and after, and a crash leaves the previous layout.
Images indexed later are searched alongside the layout until the next optimize; `loupe index` runs
optimize by itself when it pays off (at least 20,000 images and 2 shards outside the layout).
The last line on stdout is a JSON summary."""

EPILOG = """examples:
  loupe optimize ~/loupe-index                       # target recall@10 0.95
  loupe optimize ~/loupe-index --target-recall 0.99  # slower queries, fewer misses
  loupe info ~/loupe-index                           # the layout, its parameters and measured recall"""


def add_arguments(p) -> None:
    from retrieval.index.optimize import LAYOUT_TYPES
    from retrieval.index.tuning import DEFAULT_TARGET_RECALL

    p.add_argument("index", metavar="DIR", help="index directory (from `loupe index`)")
    p.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL, metavar="R",
                   help=f"recall@10 the search parameters must reach, in (0, 1] (default {DEFAULT_TARGET_RECALL})")
    p.add_argument("--layout", choices=LAYOUT_TYPES, default="auto",
                   help="index of the layout (auto: flat, HNSW, HNSW on a PCA projection or IVF-PQ (fast-scan "
                        "in RAM, else on disk; on a projection from 256-d) by size, dimension and --max-memory; "
                        "ivf-rabitq: IVF with 1-bit RaBitQ codes, on request)")
    p.add_argument("--encoder", action="append", dest="encoders", metavar="NAME", default=None,
                   help="optimize only this encoder (repeat for several; default: all)")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="memory budget of the layout (e.g. 4G)")
    p.add_argument("--queries", type=int, default=1000, metavar="N",
                   help="sample queries used to measure recall (default 1000; at most a tenth of the images for HNSW)")
    p.add_argument("--wait", action="store_true", help="wait for a running `loupe index` instead of failing")
    p.add_argument("--device", default="cpu", help="cuda: train IVF centroids on the GPU (faiss-gpu)")


def run(args) -> int:
    from indexer.index_types import parse_memory
    from retrieval.index.optimize import optimize
    from retrieval.index.tuning import check_target_recall

    target = check_target_recall(args.target_recall)
    bar = None
    progress = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        def progress(encoder: str, done: int, total: int) -> None:
            nonlocal bar
            if bar is None or bar.desc != encoder:
                if bar is not None:
                    bar.close()
                bar = tqdm(total=total, unit="vec", desc=encoder, file=sys.stderr, dynamic_ncols=True)
            bar.update(done - bar.n)
    try:
        summary = optimize(args.index, encoders=args.encoders, target_recall=target, layout=args.layout,
                           max_memory=parse_memory(args.max_memory), queries=args.queries, wait=args.wait,
                           use_gpu=str(args.device).startswith("cuda"), progress=progress)
    finally:
        if bar is not None:
            bar.close()
    for name, info in summary.encoders.items():
        reached = "" if info["reached"] else f" (target {info['target_recall']} NOT reached)"
        print(f"{name}: {info['layout']} ({info['factory']}) over {info['images']:,} images, params "
              f"{info['params'] or 'exact'}, recall@10 {info['recall@10']:.4f}{reached}, "
              f"{info['latency_ms']:.2f} ms/query, built in {info['seconds']:.1f} s", file=sys.stderr)
    print(json.dumps(summary.to_json()), flush=True)
    return 0
