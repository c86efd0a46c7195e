"""Indexer throughput: the full pipeline versus the bare encoder, and a Fashion-MNIST indexing run.

1. **pipeline vs bare forward** (same process, same encoder, same images): ``--photos N`` JPEG photos
   (scikit-image's bundled photos, randomly cropped/resized to ~400-600 px so every file is unique)
   are indexed with ``indexer.build_index`` (read + decode + preprocess in DataLoader workers, encode,
   write shards), and the same images, decoded and preprocessed beforehand, go through
   ``encoder.encode_images`` alone. Reported: images/s of each and their ratio (goal >= 0.8 on CPU).
2. **Fashion-MNIST** (Debian ``dataset-fashion-mnist``, IDX gz): the first ``--fmnist N`` images (all
   70,000 by default with ``--fmnist 70000``) written out as PNGs, indexed in a fresh subprocess:
   wall time, images/s, peak RSS of the indexer and of its workers. ``--fmnist-sizes a,b`` runs several
   sizes to show peak memory does not grow with the corpus.

Examples::

    python benchmarks/bench_index.py                                  # effnet-lite0, CPU, small sizes
    python benchmarks/bench_index.py --photos 512 --fmnist-sizes 5000,70000
    python benchmarks/bench_index.py --encoder clip-vit-b-32 --random-weights --device cuda \\
        --photos 16384 --batch-size 256 --workers 15 --fmnist 0 [--decode gpu]   # GPU speed, fp16, JPEG decode included

``--random-weights`` builds the encoder's architecture without pretrained weights (speed only; open_clip
encoders), so it runs on machines without the model hub.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FMNIST_DIR = Path(os.environ.get("LOUPE_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def register_random(name: str) -> str:
    """Register ``NAME-random``: the same architecture, randomly initialised (no download)."""
    from retrieval.encoders import get_spec, register_encoder

    spec = get_spec(name)
    if spec.family != "clip":
        raise SystemExit(f"--random-weights supports open_clip encoders only, not {spec.family}")
    row = dict(spec.options, family=spec.family, dim=spec.dim, modalities=list(spec.modalities),
               image_size=spec.image_size, local=spec.local, offline=True, random_init=True)
    register_encoder(f"{name}-random", row, replace=True)
    return f"{name}-random"


def _skimage_sources():
    from PIL import Image
    from skimage import data

    sources = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "motorcycle_left",
                 "hubble_deep_field", "page", "horse"):
        try:
            arr = getattr(data, name)()
        except Exception:  # noqa: BLE001 - some skimage images are downloaded, not bundled
            continue
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
        sources.append(Image.fromarray(arr).convert("RGB"))
    return sources


def _make_photo_range(args) -> None:
    folder, start, stop, seed = args
    sources = _skimage_sources()
    for i in range(start, stop):
        rng = np.random.default_rng((seed, i))
        img = sources[i % len(sources)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(400, 600))
        img.crop((x, y, x + cw, y + ch)).resize((side, int(side * ch / cw))).save(
            Path(folder) / f"photo-{i:06d}.jpg", quality=90)


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` unique JPEG photos (random crops of scikit-image's photos, 400-600 px wide), made in parallel."""
    import multiprocessing as mp

    folder.mkdir(parents=True, exist_ok=True)
    procs = max(1, min(os.cpu_count() or 1, n // 256 or 1))
    step = -(-n // procs)
    chunks = [(str(folder), a, min(n, a + step), seed) for a in range(0, n, step)]
    if procs == 1:
        for c in chunks:
            _make_photo_range(c)
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_make_photo_range, chunks)
    return [folder / f"photo-{i:06d}.jpg" for i in range(n)]


def read_idx_images(stem: str, limit: int) -> np.ndarray:
    """``STEM-images-idx3-ubyte`` from FMNIST_DIR, gzip (Debian's) or xz (a smaller copy to carry)."""
    from retrieval.testing.samples import read_idx

    for ext in (".gz", ".xz", ""):
        path = FMNIST_DIR / f"{stem}-images-idx3-ubyte{ext}"
        if path.is_file():
            return read_idx(path, limit)
    raise FileNotFoundError(f"{stem}-images-idx3-ubyte(.gz|.xz) not in {FMNIST_DIR}")


def _write_png_block(args) -> None:
    folder, start, block = args
    from PIL import Image

    sub = Path(folder) / f"{start // 1000:03d}"
    sub.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(block, start):
        Image.fromarray(arr, mode="L").save(sub / f"{i:05d}.png")


def write_fmnist(folder: Path, n: int) -> int:
    """The first ``n`` Fashion-MNIST images (train, then test) as PNGs, 1,000 per sub-folder ``NNN/``."""
    import multiprocessing as mp

    train = read_idx_images("train", n)
    images = train
    if len(images) < n:
        images = np.concatenate([train, read_idx_images("t10k", n - len(train))])
    blocks = [(str(folder), a, images[a:a + 1000]) for a in range(0, len(images), 1000)]
    procs = min(len(blocks), os.cpu_count() or 1)
    if procs <= 1:
        for b in blocks:
            _write_png_block(b)
    else:
        with mp.get_context("spawn").Pool(procs) as pool:
            pool.map(_write_png_block, blocks)
    return len(images)


class RssSampler:
    """Resident set size of this process every ``every`` seconds (Linux /proc), to show its course."""

    def __init__(self, every: float = 0.5):
        import threading

        self.samples: list[tuple[float, float]] = []
        self.every = every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.t0 = time.perf_counter()
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                with open("/proc/self/status") as fh:
                    kb = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                return
            self.samples.append((time.perf_counter() - self.t0, kb / 1024))

    def course(self) -> list[float]:
        """Largest RSS (MB) within each quarter of the run."""
        self.stop.set()
        self.thread.join()
        if not self.samples:
            return []
        end = self.samples[-1][0] or 1.0
        return [round(max((r for t, r in self.samples if q * end / 4 <= t <= (q + 1) * end / 4), default=0.0))
                for q in range(4)]


def peak_rss_mb() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def bench_pipeline(args, encoder_name: str, tmp: Path) -> dict:
    import torch

    from indexer.pipeline import IndexConfig, build_index
    from retrieval.encoders import create_encoder
    from retrieval.images import load_image

    paths = make_photos(tmp / "photos", args.photos)
    enc = create_encoder(encoder_name, device=args.device)
    warm = torch.stack([enc.preprocess(load_image(paths[0]))] * args.batch_size)
    enc.encode_images(warm)  # warm-up (kernels, allocator)

    # pipeline: read + decode + preprocess in workers, encode, write shards
    t = time.perf_counter()
    s = build_index(IndexConfig(sources=[str(tmp / "photos")], out=str(tmp / "idx"), encoders=[encoder_name],
                                device=args.device, batch_size=args.batch_size, workers=args.workers,
                                decode=args.decode))
    pipe_s = time.perf_counter() - t
    assert s.indexed == len(paths), s.to_json()

    # bare forward on pre-decoded, pre-processed tensors (decode not timed): the same number of images
    # in the same batch size, cycling over at most 1024 distinct decoded images
    distinct = paths[:max(args.batch_size, min(len(paths), 1024))]
    tensors = torch.stack([enc.preprocess(load_image(p)) for p in distinct])
    if enc.device.is_cuda:
        tensors = tensors.pin_memory()
    t = time.perf_counter()
    done = 0
    while done < len(paths):
        a = done % len(tensors)
        batch = tensors[a:a + min(args.batch_size, len(paths) - done)]
        enc.encode_images(batch)
        done += len(batch)
    bare_s = time.perf_counter() - t
    return {"images": len(paths), "pipeline_s": pipe_s, "pipeline_ips": len(paths) / pipe_s,
            "bare_s": bare_s, "bare_ips": len(paths) / bare_s, "ratio": (len(paths) / pipe_s) / (len(paths) / bare_s),
            "stages": s.stages.to_json()}


def bench_fmnist_child(args) -> None:
    """Runs in a fresh process so its peak RSS is its own."""
    from indexer.pipeline import IndexConfig, build_index

    tmp = Path(args.child_dir)
    pngs = Path(args.child_pngs)
    n = args.child_n
    sources = [str(pngs / f"{i:03d}") for i in range(n // 1000)]   # the parent wrote 1,000 per folder
    if n % 1000:                                                      # a partial last folder: own copy
        part = tmp / "rest"
        write_fmnist(part, n)
        sources.append(str(part / f"{n // 1000:03d}"))
    sampler = RssSampler()
    t = time.perf_counter()
    s = build_index(IndexConfig(sources=sources, out=str(tmp / "idx"), encoders=args.encoder_name.split(","),
                                device=args.device, batch_size=args.batch_size, workers=args.workers,
                                shard_size=args.shard_size))
    wall = time.perf_counter() - t
    course = sampler.course()
    own, children = peak_rss_mb()
    print(json.dumps({"images": n, "indexed": s.indexed, "failed": len(s.failed), "shards": s.shards,
                      "wall_s": wall, "ips": s.indexed / wall, "peak_rss_mb": own, "workers_peak_rss_mb": children,
                      "rss_quarters_mb": course, "stages": s.stages.to_json()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", default="effnet-lite0", help="encoder; several comma-separated for Fashion-MNIST runs")
    p.add_argument("--random-weights", action="store_true", help="random init of the architecture (speed only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--photos", type=int, default=128, help="JPEG photos for pipeline vs bare (0: skip)")
    p.add_argument("--fmnist", type=int, default=1000, help="Fashion-MNIST images to index (0: skip; 70000: all)")
    p.add_argument("--fmnist-sizes", default=None, help="comma-separated sizes (overrides --fmnist)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode", choices=("cpu", "gpu"), default="cpu", help="gpu: batched JPEG decode on the device")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--child-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-dir", help=argparse.SUPPRESS)
    p.add_argument("--child-pngs", help=argparse.SUPPRESS)
    p.add_argument("--encoder-name", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        os.environ["LOUPE_THREADS"] = str(args.threads)
    name = register_random(args.encoder) if args.random_weights else args.encoder
    if args.child_n is not None:
        args.encoder_name = name
        bench_fmnist_child(args)
        return
    import torch

    from indexer.defaults import default_workers
    from retrieval.device import resolve_device

    dev = resolve_device(args.device)
    workers = default_workers() if args.workers is None else args.workers
    print(f"# bench_index: encoder={name} device={dev.device} precision={dev.precision} "
          f"batch={args.batch_size} workers={workers} decode={args.decode} torch_threads={torch.get_num_threads()}")
    print(f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, load avg "
          f"{os.getloadavg()[0]:.1f}, python {platform.python_version()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="loupe-bench-index-") as tmp_s:
        tmp = Path(tmp_s)
        if args.photos:
            r = bench_pipeline(args, name, tmp)
            print("\n| images | pipeline s | pipeline img/s | bare forward s | bare img/s | ratio |")
            print("|---:|---:|---:|---:|---:|---:|")
            print(f"| {r['images']} | {r['pipeline_s']:.1f} | {r['pipeline_ips']:.1f} | {r['bare_s']:.1f} | "
                  f"{r['bare_ips']:.1f} | {r['ratio']:.2f} |")
            print(f"stage seconds (read, embed, write): {r['stages']}")
        sizes = [int(x) for x in args.fmnist_sizes.split(",")] if args.fmnist_sizes else (
            [args.fmnist] if args.fmnist else [])
        if sizes and not FMNIST_DIR.is_dir():
            print(f"\n{FMNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist")
            sizes = []
        rows = []
        if sizes:
            t = time.perf_counter()
            write_fmnist(tmp / "fmnist-png", max(sizes) // 1000 * 1000)
            print(f"(wrote {max(sizes) // 1000 * 1000} Fashion-MNIST PNGs in {time.perf_counter() - t:.1f} s)")
        for n in sizes:
            child_dir = tmp / f"fmnist-{n}"
            cmd = [sys.executable, __file__, "--child-n", str(n), "--child-dir", str(child_dir),
                   "--child-pngs", str(tmp / "fmnist-png"),
                   "--encoder", args.encoder, "--device", args.device, "--batch-size", str(args.batch_size),
                   "--shard-size", str(args.shard_size)] + (["--random-weights"] if args.random_weights else []) + (
                   ["--workers", str(args.workers)] if args.workers is not None else []) + (
                   ["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"indexing {n} images failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
            out = proc.stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            shutil.rmtree(child_dir, ignore_errors=True)
        if rows:
            print("\n| Fashion-MNIST images | indexed | shards | wall s | img/s | peak RSS MB (indexer) "
                  "| peak RSS MB (workers) | indexer RSS MB by quarter of the run |")
            print("|---:|---:|---:|---:|---:|---:|---:|---|")
            for r in rows:
                print(f"| {r['images']} | {r['indexed']} | {r['shards']} | {r['wall_s']:.1f} | {r['ips']:.1f} | "
                      f"{r['peak_rss_mb']:.0f} | {r['workers_peak_rss_mb']:.0f} | "
                      f"{' / '.join(str(x) for x in r['rss_quarters_mb'])} |")
            print(f"stage seconds (read, embed, write), last run: {rows[-1]['stages']}")


if __name__ == "__main__":
    main()
