"""Dedup at scale for the copy-detection benchmark (``bench_copydetect.py --scale / --scale-cli``):
``retrieval.copydetect.dedup`` over N Fashion-MNIST images in a fresh process (``scale_worker``, run through
``bench_copydetect.py --scale-worker``), and ``loupe dedup`` end to end on a pdq index of them
(``build_pdq_index``, ``run_scale_cli``), with their peak RSS."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from copydetect_data import load_fmnist  # noqa: E402


# -- scale ------------------------------------------------------------------------------------------
def scale_worker(kind: str, n: int, threshold: float) -> dict:
    """Runs in a fresh process: embed N Fashion-MNIST images (pdq / pixels), dedup, report."""
    from retrieval.copydetect.dedup import DedupConfig, deduplicate

    fm = load_fmnist()[:n]
    t0 = time.perf_counter()
    if kind == "pdq":
        import torch

        from retrieval.encoders import create_encoder

        enc = create_encoder("pdq", device="cpu")
        parts = []
        for s in range(0, n, 2000):  # 64x64 input: PDQ's own working size (the index path uses 512)
            batch = np.stack(
                [np.asarray(Image.fromarray(255 - a).convert("RGB").resize((64, 64))) for a in fm[s : s + 2000]]
            )
            parts.append(enc.hash_bits(torch.from_numpy(batch)))
        vecs = np.concatenate(parts)
    else:
        vecs = fm.reshape(n, -1).astype(np.float32)
        vecs -= vecs.mean(axis=1, keepdims=True)
        vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-9)
    t_embed = time.perf_counter() - t0
    blocks = [vecs[s : s + 10000] for s in range(0, n, 10000)]  # shards of 10,000, like an index
    ids = [f"{i:015x}" for i in range(n)]
    del fm
    rss_before = _status_mb("VmRSS")
    try:  # reset the peak-RSS counter so the peak below is the dedup's own
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    res = deduplicate(blocks, ids, DedupConfig(threshold=threshold, batch_size=4096))
    t_dedup = time.perf_counter() - t0
    return {
        "kind": kind,
        "n": n,
        "dim": int(vecs.shape[1]) * (8 if kind == "pdq" else 1),
        "threshold": threshold,
        "embed_s": round(t_embed, 1),
        "dedup_s": round(t_dedup, 1),
        "pairs": len(res.pairs),
        "groups": len(res.groups),
        "images_in_groups": res.summary()["images_in_groups"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": _status_mb("VmHWM"),
        "vectors_mb": round(vecs.nbytes / 2**20, 1),
    }


def _status_mb(key: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def build_pdq_index(n: int, out: Path) -> float:
    """A Loupe index of N Fashion-MNIST images with the pdq encoder (binary shards of 10,000), written
    with retrieval.index.store (as `loupe index` would, without decoding 70,000 files). Returns seconds."""
    import faiss
    import torch

    from retrieval.encoders import create_encoder
    from retrieval.index import store, vector_files

    t0 = time.perf_counter()
    fm = load_fmnist()[:n]
    enc = create_encoder("pdq", device="cpu")
    shards = []
    for s_no, start in enumerate(range(0, n, 10000)):
        part = fm[start : start + 10000]
        batch = np.stack([np.asarray(Image.fromarray(255 - a).convert("RGB").resize((64, 64))) for a in part])
        codes = enc.hash_bits(torch.from_numpy(batch))
        index = faiss.IndexBinaryFlat(256)
        index.add(codes)
        name = store.shard_name(s_no)
        rows = []
        for i, a in enumerate(part):
            sha = store.sha256_bytes(a.tobytes())
            rows.append(
                {
                    "id": store.content_id(sha),
                    "source": f"fashion-mnist:{start + i}",
                    "path": None,
                    "caption": None,
                    "width": 28,
                    "height": 28,
                    "sha256": sha,
                    "size": 784,
                    "mtime": 0.0,
                    "aliases": [],
                    "extra": {},
                }
            )
        store.write_metadata(out, name, rows)
        vector_files.write_vectors(out, "pdq", name, index)
        shards.append(store.ShardEntry(name=name, count=len(part)))
    entry = store.EncoderEntry(name="pdq", dim=256, index_type="binary", factory="BFlat")
    store.write_manifest(out, store.Manifest(encoders={"pdq": entry}, shards=shards))
    return time.perf_counter() - t0


def run_scale_cli(n: int, threshold: float = 0.9) -> dict:
    """`loupe dedup` on an index of N Fashion-MNIST images: wall time and peak RSS of the CLI process."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="loupe-dedup-bench-") as tmp:
        idx = Path(tmp) / "idx"
        build_s = build_pdq_index(n, idx)
        out = Path(tmp) / "pairs.parquet"
        cmd = [sys.executable, "-m", "loupe", "dedup", str(idx), "--threshold", str(threshold), "--out", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - t0
        peak = _child_peak_mb(proc)
        proc.stderr = stderr
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return {
            "n": n,
            "build_s": round(build_s, 1),
            "wall_s": round(wall, 1),
            "peak_rss_mb": peak,
            "summary": proc.stderr.strip().splitlines()[-1],
            "command": " ".join(cmd[1:]),
        }


def _child_peak_mb(proc) -> float:
    """Peak RSS of a finished child. RUSAGE_CHILDREN is the max over all waited-for children, so the
    scale-cli rows run smallest first and each row's figure is the largest child so far."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
