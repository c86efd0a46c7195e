"""Scale-out on Ray, simulated on one host: indexing throughput and serving QPS with 1 vs 2 workers/replicas.

    .venv/bin/python benchmarks/bench_ray.py [--images 160] [--vectors 100000] [--dim 256] [--requests 400]

* indexing: ``build_index`` of the first ``--images`` Tux Paint stamps (Debian ``tuxpaint-stamps-default``;
  synthetic pictures when absent) with the offline ``effnet-lite0`` encoder: a local run, then ``--ray``
  with 1 and 2 encoder actors (1 and 2 shard writers), each into a fresh folder; images/s of the whole
  run (Ray's actor start-up included) and of the stages after start-up;
* serving: a flat index of ``--vectors`` random unit vectors (``--vectors`` Parquet, bring-your-own
  embeddings), 2 partitions; ``POST /api/search`` with a ``vector`` (no encoder) from 4 client threads
  through the Flask app: single process, then Ray Serve with 1 and 2 replicas per partition. Answers are
  checked equal to the single-process ones.

Ray runs as a local cluster with ``--ray-cpus`` logical CPUs (default 4) and a 300 MB object store: on a
2-core machine, 2 workers are a simulation of scale-out, not a measurement of it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _corpus(n: int, folder: Path) -> tuple[list[str], str]:
    from retrieval.testing.samples import tuxpaint_stamps

    stamps = tuxpaint_stamps() if Path("/usr/share/tuxpaint/stamps").is_dir() else []
    if len(stamps) >= n:
        for i, (path, _) in enumerate(stamps[:n]):
            os.symlink(path, folder / f"{i:05d}.png")
        return [str(folder)], f"{n} Tux Paint stamps"
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / f"{i:05d}.jpg")
    return [str(folder)], f"{n} synthetic 224 px JPEGs"


def bench_index(args, tmp: Path) -> list[dict]:
    import ray

    from indexer.pipeline import IndexConfig, build_index

    src = tmp / "images"
    src.mkdir()
    sources, what = _corpus(args.images, src)
    rows = []
    for label, ray_kw in [("local (no Ray)", None), ("Ray, 1 actor + 1 writer", (1, 1)),
                          ("Ray, 2 actors + 2 writers", (2, 2))]:
        kw = dict(sources=sources, out=tmp / f"idx-{len(rows)}", encoders=["effnet-lite0"], device="cpu",
                  batch_size=16, shard_size=max(8, args.images // 4), optimize="never", index_type="flat")
        if ray_kw:
            kw.update(ray="local", ray_actors=ray_kw[0], ray_writers=ray_kw[1])
        else:
            kw.update(workers=1)
        t0 = time.perf_counter()
        summary = build_index(IndexConfig(**kw))
        wall = time.perf_counter() - t0
        stages = summary.stages.to_json()
        rows.append({"run": label, "images": summary.indexed, "wall_s": round(wall, 2),
                     "images_per_s": round(summary.indexed / wall, 2), "stages": stages, "corpus": what})
        print(f"{label:28s} {summary.indexed:5d} images  {wall:7.2f} s  {summary.indexed / wall:7.2f} img/s  "
              f"stages {stages}", flush=True)
    ray.shutdown()
    return rows


def _vector_index(args, tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexer.pipeline import IndexConfig, build_index

    rng = np.random.default_rng(1)
    vecs = rng.standard_normal((args.vectors, args.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    table = pa.table({"id": [f"v{i}" for i in range(args.vectors)],
                      "vec": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), args.dim)})
    pq.write_table(table, tmp / "vectors.parquet")
    out = tmp / "vindex"
    build_index(IndexConfig(sources=[str(tmp / "vectors.parquet")], out=out, encoders=["bench-random"],
                            vectors="vec", shard_size=max(1, args.vectors // 8), index_type="flat",
                            optimize="never"))
    return out


def _qps(client_factory, queries: np.ndarray, k: int, threads: int) -> tuple[float, list[float], list]:
    """Requests/s over all ``queries`` from ``threads`` clients; per-request latencies; the answers."""
    answers: list = [None] * len(queries)
    lat: list[float] = [0.0] * len(queries)
    nxt = {"i": 0}
    lock = threading.Lock()

    def work():
        client = client_factory()
        while True:
            with lock:
                i = nxt["i"]
                nxt["i"] += 1
            if i >= len(queries):
                return
            t = time.perf_counter()
            r = client.post("/api/search", json={"vector": queries[i].tolist(), "k": k})
            lat[i] = time.perf_counter() - t
            body = r.get_json()
            answers[i] = (r.status_code, [h["id"] for h in body.get("results", [])], body.get("partial"))

    t0 = time.perf_counter()
    ts = [threading.Thread(target=work) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return len(queries) / (time.perf_counter() - t0), lat, answers


def bench_serve(args, tmp: Path) -> list[dict]:
    import faiss

    from retrieval.engine.engine import Engine
    from server.app import create_app
    from server.ray_serve import RayServeConfig, create_ray_app, deploy
    from server.ray_serve.deploy import start_ray

    faiss.omp_set_num_threads(1)
    out = _vector_index(args, tmp)
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((args.requests, args.dim)).astype(np.float32)
    warm = queries[:20]
    engine = Engine(out, device="cpu", search_device="cpu")
    app = create_app({"RELOAD_INTERVAL": 0}, engine=engine)
    _qps(app.test_client, warm, 10, 1)
    qps, lat, ref = _qps(app.test_client, queries, 10, args.threads)
    rows = [{"run": "single process", "qps": round(qps, 1), "p50_ms": round(statistics.median(lat) * 1e3, 2),
             "equal_to_single_process": True}]
    print(f"{'single process':28s} {qps:7.1f} QPS  p50 {statistics.median(lat) * 1e3:6.2f} ms", flush=True)
    start_ray(None, num_cpus=args.ray_cpus, object_store_memory=300 * 2**20)
    for replicas in (1, 2):
        dep = deploy(out, RayServeConfig(partitions=2, replicas=replicas, searcher_cpus=0.5, encoder_cpus=0.1,
                                         device="cpu", timeout_s=30))
        try:
            app = create_ray_app(dep)
            _qps(app.test_client, warm, 10, 1)
            qps, lat, got = _qps(app.test_client, queries, 10, args.threads)
        finally:
            dep.shutdown()
        same = [g[:2] for g in got] == [r[:2] for r in ref] and not any(g[2] for g in got)
        label = f"Ray Serve, 2 partitions x {replicas}"
        rows.append({"run": label, "qps": round(qps, 1), "p50_ms": round(statistics.median(lat) * 1e3, 2),
                     "equal_to_single_process": same})
        print(f"{label:28s} {qps:7.1f} QPS  p50 {statistics.median(lat) * 1e3:6.2f} ms  equal: {same}", flush=True)
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    p.add_argument("--skip-index", action="store_true")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()
    import ray

    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
           "utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_index:
            ray.init(num_cpus=args.ray_cpus, object_store_memory=300 * 2**20, include_dashboard=False,
                     log_to_driver=False)
            out["index"] = bench_index(args, Path(tmp))
        if not args.skip_serve:
            out["serve"] = bench_serve(args, Path(tmp))
    out["load_after"] = round(os.getloadavg()[0], 2)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
