"""Cost of the ``colour-names`` encoder next to the image encoder it is indexed with.

Bare throughput on pre-made uint8 inputs (no decoding), same process, same device: ``colour-names``
(64×64 thumbnails → 11-d colour distributions: lookup table + object weights) and ``effnet-lite0``
(224×224, the offline image encoder) at the same batch size; median of ``--runs`` timed passes after a
warm-up. On a GPU it also checks that the device result equals the CPU one (max abs difference of the
distributions).

    python benchmarks/bench_colour.py                       # CPU
    python benchmarks/bench_colour.py --device cuda --images 16384 --batch-size 512
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retrieval.colour import naming as colour
from retrieval.device import resolve_device  # noqa: E402
from retrieval.encoders import create_encoder


def timed(fn, batches, runs: int, sync) -> float:
    fn(batches[0])
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for b in batches:
            fn(b)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-effnet", action="store_true")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    cuda = dev.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    n, bs = args.images, args.batch_size
    # smooth random images: a coloured blob on a background, so the object weights have work to do
    thumbs = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    thumbs = torch.nn.functional.interpolate(thumbs.float(), size=(64, 64), mode="bilinear").round().to(torch.uint8)
    batches = [thumbs[s:s + bs].to(dev.device) for s in range(0, n, bs)]
    colour.lookup_table()
    t_col = timed(colour.colour_names, batches, args.runs, sync)
    print(f"# bench_colour: device={dev.device} precision={dev.precision} images={n} batch={bs} runs={args.runs}")
    print(f"# machine: {platform.node()} {platform.machine()} {os.cpu_count()} cores, load avg "
          f"{os.getloadavg()[0]:.1f}, python {platform.python_version()}, torch {torch.__version__}"
          + (f", {torch.cuda.get_device_name()}" if cuda else ""))
    print("\n| encoder | input | img/s (median) |\n|---|---|---:|")
    print(f"| colour-names | 64×64 uint8 | {n / t_col:,.0f} |")
    if not args.skip_effnet:
        enc = create_encoder("effnet-lite0", device=args.device)
        big = torch.nn.functional.interpolate(thumbs[:bs].float(), size=(224, 224), mode="bilinear")
        x = ((big / 255.0 - 0.5) / 0.5).to(dev.device)
        eb = [x] * max(1, n // bs)
        t_eff = timed(enc.encode_images, eb, args.runs, sync)
        ips = len(eb) * bs / t_eff
        print(f"| effnet-lite0 ({dev.precision}) | 224×224 normalised | {ips:,.0f} |")
        print(f"\ncolour-names costs {100 * ips / (n / t_col):.1f} % of effnet-lite0's time per image")
    if cuda:
        cpu = colour.colour_names(thumbs[:bs])
        gpu = colour.colour_names(batches[0])
        print(f"CUDA vs CPU distributions, max abs difference over {bs} images: {float(np.abs(cpu - gpu).max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
