"""GPU figures, for a machine with a CUDA GPU (run by the lead on a lent H100/H200).

1. ``clip-vit-b-32`` (open_clip ViT-B-32 architecture, random weights: speed does not depend on
   the values) in fp16 autocast: the bare forward pass on pre-decoded tensors on the GPU, and the
   whole ``loupe index`` pipeline (JPEG read + SHA-256 + decode + resize in DataLoader workers,
   pinned memory, encode, shard writing) over generated JPEG photos.
2. Exact search over 1M random 512-d unit vectors: faiss-cpu ``IndexFlatIP`` on all cores vs. a
   torch fp16 matmul + top-k on the GPU (the same exact search), 1,000 queries, k=10.

    PYTHONPATH=. python benchmarks/bench_gpu.py --images 30000 --out gpu.json

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _make_jpegs(args):
    start, count, folder, seed = args
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed + start)
    photos = [np.asarray(getattr(data, n)()) for n in ("astronaut", "chelsea", "coffee", "rocket")]
    photos = [p if p.ndim == 3 else np.stack([p] * 3, -1) for p in photos]
    for i in range(start, start + count):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        ch, cw = int(h * rng.uniform(0.5, 1)), int(w * rng.uniform(0.5, 1))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(p[y:y + ch, x:x + cw, :3]).resize((500, 375))
        arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, size=(375, 500, 3))
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(Path(folder) / f"{i:06d}.jpg", quality=85)


def make_jpegs(folder: Path, n: int, procs: int) -> float:
    t = time.perf_counter()
    chunk = (n + procs - 1) // procs
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_make_jpegs, [(s, min(chunk, n - s), str(folder), 0) for s in range(0, n, chunk)])
    return time.perf_counter() - t


def bench_forward(enc, batch: int, iters: int) -> float:
    x = torch.randn(batch, 3, 224, 224, device=enc.device.device)
    for _ in range(3):
        enc.encode_images(x)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        enc.encode_images(x)  # includes the device→host copy of the vectors, as the pipeline does
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def bench_search(n: int, d: int, nq: int, k: int, dev: str = "cuda") -> dict:
    import faiss

    rng = np.random.default_rng(0)
    xb = rng.standard_normal((n, d), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(d)
    index.add(xb)
    index.search(xq[:10], k)
    t = time.perf_counter()
    d_cpu, i_cpu = index.search(xq, k)
    cpu_s = time.perf_counter() - t
    dtype = torch.float16 if dev == "cuda" else torch.float32
    gb = torch.from_numpy(xb).to(dev, dtype)
    gq = torch.from_numpy(xq).to(dev, dtype)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        scores, ids = (gq @ gb.T).topk(k, dim=1)
        ids = ids.cpu().numpy()
        times.append(time.perf_counter() - t)
    gpu_s = statistics.median(times)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, i_cpu)]))
    return {"n": n, "d": d, "queries": nq, "k": k, "faiss_cpu_flat_qps": nq / cpu_s,
            "faiss_threads": faiss.omp_get_max_threads(), "torch_gpu_fp16_exact_qps": nq / gpu_s,
            "gpu_vs_cpu": cpu_s / gpu_s, "gpu_fp16_recall_at_10_vs_fp32": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=30000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--search-n", type=int, default=1_000_000)
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cpu only to smoke-test this script")
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--runs", default="cpu,gpu,gpu-half",
                    help="pipeline runs: cpu (CPU decode, all workers), gpu (GPU decode), gpu-half (half the workers)")
    args = ap.parse_args()

    from indexer.pipeline import IndexConfig, build_index
    from retrieval.encoders import create_encoder, get_spec, register_encoder

    dev = args.device
    result: dict = {"gpu": torch.cuda.get_device_name(0) if dev == "cuda" else "none",
                    "torch": torch.__version__, "cpus": os.cpu_count(),
                    "python": platform.python_version()}
    row = dict(get_spec("clip-vit-b-32").options)
    row.update(random_init=True)
    register_encoder("clip-vit-b-32-random", {"family": "clip", "dim": 512, "modalities": ["image", "text"],
                                              "image_size": 224, "local": "patch_tokens", **row}, replace=True)
    enc = create_encoder("clip-vit-b-32-random", device=dev)
    if not args.skip_forward:
        result["forward_fp16_images_per_s"] = {b: bench_forward(enc, b, 20 if dev == "cuda" else 2)
                                              for b in ((64, 256, 1024) if dev == "cuda" else (8,))}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "jpegs"
        folder.mkdir()
        result["jpeg_generation_s"] = make_jpegs(folder, args.images, os.cpu_count() or 2)
        table = {"cpu": (args.workers, "cpu"), "gpu": (args.workers, "gpu"),
                 "gpu-half": (max(1, args.workers // 2), "gpu")}
        for workers, decode in [table[r] for r in args.runs.split(",")]:
            out = Path(tmp) / f"index-{workers}-{decode}"
            t = time.perf_counter()
            summary = build_index(IndexConfig(sources=[str(folder)], out=str(out), encoders=["clip-vit-b-32-random"],
                                              device=dev, batch_size=args.batch_size, workers=workers,
                                              index_type="flat", decode=decode))
            wall = time.perf_counter() - t
            result[f"pipeline_workers_{workers}_decode_{decode}"] = {
                "indexed": summary.indexed, "failed": len(summary.failed), "wall_s": wall,
                "images_per_s": summary.indexed / wall, "stages": summary.stages.to_json()}
    if not args.skip_search:
        result["search"] = bench_search(args.search_n, 512, 1000, 10, dev)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
