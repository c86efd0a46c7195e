"""CPU vs GPU JPEG decoding (``--decode gpu``): how close the stored vectors are, per encoder, and the time.

Indexes the same ``--photos`` JPEGs (scikit-image photos, randomly cropped/resized, as in
``bench_index.py``) twice in one process — ``decode="cpu"`` and ``decode="gpu"`` — with every
``--encoder``, and reports per encoder the min / median cosine between the two vectors of each image
and each run's wall time. Run on a CUDA machine (nvJPEG); on a CPU-only machine ``decode="gpu"`` uses
torchvision's CPU JPEG decoder.

    python benchmarks/bench_decode_parity.py --device cuda --photos 512 --encoder effnet-lite0,colour-names
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import make_photos  # noqa: E402

from indexer.pipeline import IndexConfig, build_index, stored_vectors  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--photos", type=int, default=128)
    ap.add_argument("--encoder", default="effnet-lite0,colour-names")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    names = args.encoder.split(",")
    with tempfile.TemporaryDirectory(prefix="loupe-decode-parity-") as tmp_s:
        tmp = Path(tmp_s)
        make_photos(tmp / "src", args.photos)
        walls = {}
        for mode in ("cpu", "gpu"):
            t = time.perf_counter()
            s = build_index(IndexConfig(sources=[str(tmp / "src")], out=tmp / mode, encoders=names, device=args.device,
                                        batch_size=args.batch_size, workers=args.workers, decode=mode))
            walls[mode] = (time.perf_counter() - t, s.indexed, len(s.failed))
        print(f"# {args.photos} JPEGs, device {args.device}; wall s / indexed / failed: "
              + ", ".join(f"{m} {w:.1f} / {n} / {f}" for m, (w, n, f) in walls.items()))
        print("\n| encoder | images | min cosine cpu vs gpu decode | median cosine |\n|---|---:|---:|---:|")
        for name in names:
            vc, ic = stored_vectors(tmp / "cpu", name)
            vg, ig = stored_vectors(tmp / "gpu", name)
            cos = np.sum(vc * vg[[ig.index(i) for i in ic]], axis=1)
            print(f"| {name} | {len(cos)} | {cos.min():.5f} | {np.median(cos):.5f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
