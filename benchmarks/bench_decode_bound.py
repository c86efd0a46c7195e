"""Issue 18, bounded decoding: peak memory and time of decoding big images, before and after.

Each measurement runs in a fresh Python process (peak RSS is per process: ``ru_maxrss`` after the
imports and set-up is the baseline, the figure is the growth over it) on a code tree given by
``PYTHONPATH``: this checkout ("after") and, with ``--old DIR``, an older checkout ("before", e.g.
``git worktree add /tmp/old <commit>``). Cases:

* ``png16``: a 10,000 × 10,000 16-bit greyscale PNG (~210 KB, 200 MB decoded) through ``load_image``
  and effnet-lite0's preprocessing (``Encoder.pixels``), at the default limits and at
  ``LOUPE_MAX_DECODE_MB=128`` (refused from the header);
* ``jpeg``: an 8000 × 6000 JPEG (tiled from the sample photos), ``load_image`` full vs reduced
  (``min_side=256``: JPEG draft);
* ``server``: four concurrent ``/api/search`` uploads of the 16-bit PNG to one app (Flask test clients
  on four threads in one process), effnet-lite0 index of three photos.

    python benchmarks/bench_decode_bound.py --old /tmp/old --runs 3

Prints a table of medians; the figures go into ``benchmarks/RESULTS.md`` by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, resource, sys, threading, time, io
def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
case, data_path, extra = sys.argv[1], sys.argv[2], sys.argv[3]
data = open(data_path, "rb").read()
out = {}
if case in ("png16", "jpeg"):
    from retrieval.images import load_image
    from retrieval.encoders import create_encoder
    enc = create_encoder("effnet-lite0", device="cpu")
    from PIL import Image
    enc.pixels([Image.new("RGB", (300, 300))])     # warm: the transform's imports
    base = rss_mb(); t0 = time.perf_counter()
    try:
        if extra == "pixels":
            out["shape"] = list(enc.pixels([data]).shape)
        elif extra == "full":
            out["size"] = list(load_image(data).size)
        elif extra == "draft":
            out["size"] = list(load_image(data, min_side=256).size)
        out["status"] = "ok"
    except Exception as exc:
        out["status"] = type(exc).__name__ + ": " + str(exc)[:120]
elif case == "server":
    from retrieval.engine.engine import Engine
    from server.app import create_app
    app = create_app(engine=Engine(extra, device="cpu"))
    small = open(data_path + ".small.png", "rb").read()
    app.test_client().post("/api/search", data={"image": (io.BytesIO(small), "w.png")},
                           content_type="multipart/form-data")     # warm: the encoder is loaded
    base = rss_mb(); t0 = time.perf_counter()
    codes = []
    def one():
        r = app.test_client().post("/api/search", data={"image": (io.BytesIO(data), "q.png"), "k": "3"},
                                   content_type="multipart/form-data")
        codes.append(r.status_code)
    threads = [threading.Thread(target=one) for _ in range(4)]
    [t.start() for t in threads]; [t.join() for t in threads]
    out["status"] = ",".join(map(str, sorted(codes)))
out["seconds"] = round(time.perf_counter() - t0, 3)
out["base_mb"] = round(base, 1); out["peak_mb"] = round(rss_mb(), 1); out["growth_mb"] = round(rss_mb() - base, 1)
print("RESULT " + json.dumps(out))
'''


def png16(width: int, height: int, value: int = 0x0303) -> bytes:
    """A 16-bit greyscale PNG of one value, streamed (no full array in memory)."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" + struct.pack(">H", value) * width
    comp = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = [comp.compress(row * 500) for _ in range(height // 500)]
    idat += [comp.compress(row * (height % 500)), comp.flush()]
    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(idat)) + chunk(b"IEND", b"")


def big_jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image

    from retrieval.testing.samples import skimage_photos

    tiles = [img.resize((500, 500)) for img in skimage_photos().values()]
    canvas = Image.new("RGB", (width, height))
    for i, y in enumerate(range(0, height, 500)):
        for j, x in enumerate(range(0, width, 500)):
            canvas.paste(tiles[(i * 7 + j) % len(tiles)], (x, y))
    canvas.save(path, quality=90)


def run_child(tree: Path, case: str, data: Path, extra: str, env: dict[str, str] | None = None) -> dict:
    environ = {**os.environ, "PYTHONPATH": str(tree), "LOUPE_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", CHILD, case, str(data), extra], cwd=tree, env=environ,
                          capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"status": f"child failed ({proc.returncode}): {proc.stderr[-300:]}", "seconds": 0,
            "growth_mb": 0, "peak_mb": 0, "base_mb": 0}


def build_index(tree: Path, work: Path) -> Path:
    """An effnet-lite0 index of three sample photos, built by ``tree``'s own ``loupe index``."""
    from retrieval.testing.samples import skimage_photos

    photos = work / "photos"
    photos.mkdir(exist_ok=True)
    for name in ("chelsea", "coffee", "rocket"):
        skimage_photos()[name].save(photos / f"{name}.png")
    out = work / "index"
    code = ("import sys; from loupe.cli.main import main; "
            f"sys.exit(main(['index', {str(photos)!r}, '--out', {str(out)!r}, '--encoder', 'effnet-lite0', "
            "'--device', 'cpu', '--workers', '0']))")
    subprocess.run([sys.executable, "-c", code], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   capture_output=True, timeout=900)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, help="a checkout of the code before (a git worktree)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-server", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loupe-bench-decode-"))
    bomb = work / "bomb16.png"
    bomb.write_bytes(png16(10_000, 10_000))
    from PIL import Image

    Image.new("RGB", (200, 150), "red").save(str(bomb) + ".small.png")
    jpeg = work / "big.jpg"
    big_jpeg(jpeg, 8000, 6000)
    print(f"16-bit PNG: {bomb.stat().st_size:,} bytes; JPEG: {jpeg.stat().st_size:,} bytes; {work}", flush=True)

    trees = [("after", ROOT)] + ([("before", args.old)] if args.old else [])
    cases: list[tuple[str, str, Path, str, dict]] = []
    for label, _ in trees:
        cases.append((f"png16 load+preprocess, {label}", label, bomb, "pixels", {}))
    cases.append(("png16 load+preprocess, after, LOUPE_MAX_DECODE_MB=128", "after", bomb, "pixels",
                  {"LOUPE_MAX_DECODE_MB": "128"}))
    cases.append(("jpeg 8000x6000 load_image full", "after", jpeg, "full", {}))
    cases.append(("jpeg 8000x6000 load_image min_side=256 (draft)", "after", jpeg, "draft", {}))
    for label, _ in trees:
        cases.append((f"jpeg 8000x6000 load+preprocess, {label}", label, jpeg, "pixels", {}))
    tree_of = dict(trees)
    rows = []
    for name, label, data, extra, env in cases:
        results = [run_child(tree_of[label], "png16" if data == bomb else "jpeg", data, extra, env)
                   for _ in range(args.runs)]
        rows.append((name, results))
        print_row(name, results)
    if not args.skip_server:
        index = build_index(args.old or ROOT, work)
        for label, tree in trees:
            for env_name, env in (("defaults", {}), ("LOUPE_MAX_DECODE_MB=128", {"LOUPE_MAX_DECODE_MB": "128"})):
                if label == "before" and env:
                    continue
                name = f"server, 4 concurrent png16 uploads, {label}, {env_name}"
                results = [run_child(tree, "server", bomb, str(index), env) for _ in range(args.runs)]
                rows.append((name, results))
                print_row(name, results)
    return 0


def print_row(name: str, results: list[dict]) -> None:
    med = {k: statistics.median(r[k] for r in results) for k in ("seconds", "growth_mb", "peak_mb")}
    statuses = sorted({r["status"] for r in results})
    runs = ", ".join(f"{r['seconds']:.2f}s/+{r['growth_mb']:.0f}MB" for r in results)
    print(f"| {name} | {med['seconds']:.2f} s | +{med['growth_mb']:.0f} MB | {med['peak_mb']:.0f} MB | "
          f"{'; '.join(statuses)} | runs: {runs}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
