"""Server and engine benchmark: load, overhead, scale.

    .venv/bin/python benchmarks/bench_server.py                       # everything, default sizes
    .venv/bin/python benchmarks/bench_server.py --seconds 20 --scale-n 100000   # reduced

1. **Load**: ``loupe serve`` (waitress, a separate process) over an index of ``--n`` images (default
   10,000: synthetic vectors in the real ``conse-effnet-lite0`` space plus the real scikit-image
   photos, in 2 shards); ``--clients`` (8) concurrent keep-alive clients send mixed queries for
   ``--seconds`` (60): text (distinct ImageNet-class prompts, so the text model really runs) and
   image uploads (multipart JPEGs). Reports QPS, p50/p99 latency and non-2xx responses.
2. **Overhead**: ``Engine.search_vector`` vs. raw FAISS (one ``IndexFlatIP`` over the same vectors,
   same query vectors, one query per call, one thread); HTTP latency minus encoder time (the
   server's ``timings.embed_ms``) for text queries, and HTTP latency of raw-vector queries.
3. **Scale**: ``--scale-n`` (default 1,000,000) synthetic ``--scale-dim`` (512) vectors, clustered
   (a random linear map of 64-d Gaussians plus noise: a low intrinsic dimension, as real embeddings
   have) so that ANN behaves roughly as on real data; the index type that
   ``indexer.index_types.choose_index_type("auto")`` picks; latency, recall@10 vs. exact search,
   bytes per vector on disk and in memory.

Figures are printed as a table and written to ``--out`` (benchmarks/results/server.md).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from retrieval.index import store, vector_files  # noqa: E402


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible (shared with other jobs), Python {platform.python_version()}"


# -- index building --------------------------------------------------------------------------------
def sample_photos():
    from PIL import Image
    from skimage import data

    out = {}
    for name in ("astronaut", "chelsea", "coffee", "rocket", "camera", "motorcycle_left", "horse", "moon"):
        try:
            arr = np.asarray(getattr(data, name)())
        except Exception:  # noqa: BLE001
            continue
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        if arr.dtype != np.uint8:
            arr = (255 * (arr - arr.min()) / max(1e-9, float(arr.max() - arr.min()))).astype(np.uint8)
        out[name] = Image.fromarray(arr).convert("RGB")
    return out


def build_load_index(out: Path, n: int, encoder: str, shards: int = 1) -> tuple[Path, dict[str, bytes]]:
    """``n`` images: the real photos (embedded for real) + synthetic unit vectors in the same space."""
    import faiss

    from retrieval.encoders import create_encoder

    enc = create_encoder(encoder, device="cpu")
    photos = sample_photos()
    folder = out / "photos"
    folder.mkdir(parents=True, exist_ok=True)
    uploads, rows, real = {}, [], []
    for name, img in photos.items():
        p = folder / f"{name}.jpg"
        img.save(p, quality=90)
        data = p.read_bytes()
        small = io.BytesIO()
        img.copy().resize((256, int(256 * img.height / img.width))).save(small, format="JPEG", quality=90)
        uploads[name] = small.getvalue()
        sha = store.sha256_bytes(data)
        rows.append({"id": store.content_id(sha), "source": str(p), "path": str(p), "caption": name,
                     "width": img.width, "height": img.height, "sha256": sha, "size": len(data)})
        real.append(enc.encode_images([img])[0])
    rng = np.random.default_rng(0)
    synth = unit(rng.standard_normal((n - len(rows), enc.dim)))
    for i in range(len(synth)):
        sha = store.sha256_bytes(f"synthetic-{i}".encode())
        rows.append({"id": store.content_id(sha), "source": f"synthetic://{i}", "caption": f"synthetic {i}",
                     "sha256": sha})
    vecs = np.concatenate([np.stack(real), synth]).astype(np.float32)
    sizes = np.array_split(np.arange(n), shards)
    entries = []
    index_dir = out / "index"
    for s, idx in enumerate(sizes):
        name = store.shard_name(s)
        store.write_metadata(index_dir, name, [rows[i] for i in idx])
        index = faiss.IndexFlatIP(enc.dim)
        index.add(vecs[idx])
        vector_files.write_vectors(index_dir, encoder, name, index)
        entries.append(store.ShardEntry(name, len(idx)))
    store.write_manifest(index_dir, store.Manifest(
        encoders={encoder: store.EncoderEntry(encoder, enc.dim, modalities=list(enc.modalities))}, shards=entries))
    return index_dir, uploads


# -- HTTP load -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "loupe", "serve", str(index_dir), "--port", str(port),
                             "--threads", str(threads), "--device", "cpu"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start")


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = "loupebench" + str(random.randint(0, 1 << 30))
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
                 f"Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def prompts() -> list[str]:
    try:
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        names = list(IMAGENET_CLASSNAMES)
    except ImportError:
        names = [f"thing {i}" for i in range(1000)]
    templates = ["a photo of a {}", "a {} in the wild", "a close-up of a {}", "a drawing of a {}",
                 "a blurry photo of a {}", "a {} at night"]
    return [t.format(n) for t in templates for n in names]


def run_load(port: int, seconds: float, clients: int, uploads: dict[str, bytes], text_share: float = 0.5):
    texts = prompts()
    random.Random(0).shuffle(texts)
    counter = {"i": 0}
    lock = threading.Lock()
    lat, kinds, statuses, embed = [], [], [], []
    stop = time.time() + seconds

    def next_text():
        with lock:
            counter["i"] += 1
            return texts[counter["i"] % len(texts)]

    def client(seed):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        names = list(uploads)
        while time.time() < stop:
            if rng.random() < text_share:
                body, ctype, kind = json.dumps({"text": next_text(), "k": 20}).encode(), "application/json", "text"
            else:
                body, ctype = multipart({"k": "20"}, uploads[rng.choice(names)])
                kind = "image"
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
                resp = conn.getresponse()
                payload = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException):
                status = 599
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                payload = b"{}"
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                kinds.append(kind)
                statuses.append(status)
                if status == 200:
                    embed.append(json.loads(payload).get("timings", {}).get("embed_ms", 0.0) / 1e3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - t0
    by_kind = {k: [t for t, kk in zip(lat, kinds) if kk == k] for k in ("text", "image")}
    return {"requests": len(lat), "seconds": wall, "qps": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "non_2xx": sum(1 for s in statuses if not 200 <= s < 300),
            "text_p50_ms": pct(by_kind["text"], 50) * 1e3, "image_p50_ms": pct(by_kind["image"], 50) * 1e3,
            "n_text": len(by_kind["text"]), "n_image": len(by_kind["image"]),
            "embed_p50_ms": pct(embed, 50) * 1e3}


def run_sequential_overhead(port: int, n: int, dim: int):
    """One client: text queries (latency minus the server-reported embed time) and raw-vector queries."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    texts = prompts()[-n:]
    minus, vec_lat = [], []
    for t in texts:
        t0 = time.perf_counter()
        conn.request("POST", "/api/search", body=json.dumps({"text": t, "k": 20}),
                     headers={"Content-Type": "application/json"})
        body = json.loads(conn.getresponse().read())
        minus.append(time.perf_counter() - t0 - body["timings"]["embed_ms"] / 1e3)
    rng = np.random.default_rng(1)
    for _ in range(n):
        v = unit(rng.standard_normal(dim)).round(5).tolist()
        t0 = time.perf_counter()
        conn.request("POST", "/api/search", body=json.dumps({"vector": v, "k": 20}),
                     headers={"Content-Type": "application/json"})
        conn.getresponse().read()
        vec_lat.append(time.perf_counter() - t0)
    return {"http_minus_encoder_p50_ms": pct(minus, 50) * 1e3, "http_minus_encoder_p99_ms": pct(minus, 99) * 1e3,
            "vector_http_p50_ms": pct(vec_lat, 50) * 1e3}


# -- engine vs raw faiss ---------------------------------------------------------------------------
def engine_vs_faiss(index_dir: Path, encoder: str, nq: int = 1000, k: int = 20, repeats: int = 3):
    import faiss

    from retrieval.engine.engine import Engine

    engine = Engine(index_dir, device="cpu")
    vecs = np.concatenate([v for _, v, _ in engine.all_vectors(encoder)])
    raw = faiss.IndexFlatIP(vecs.shape[1])
    raw.add(vecs)
    queries = unit(np.random.default_rng(5).standard_normal((nq, vecs.shape[1])))
    for q in queries[:50]:                      # warm-up (page in the memory-mapped shard)
        raw.search(q[None], k)
        engine.search_vector(encoder, q, k)
    t_raw, t_eng = [], []
    for _ in range(repeats):   # interleaved query by query: the machine is shared, load drifts
        for q in queries:
            t0 = time.perf_counter()
            raw.search(q[None], k)
            t1 = time.perf_counter()
            engine.search_vector(encoder, q, k)
            t2 = time.perf_counter()
            t_raw.append(t1 - t0)
            t_eng.append(t2 - t1)
    best_raw, best_eng = float(np.median(t_raw)) * nq, float(np.median(t_eng)) * nq
    same = all(
        [h.id for h in engine.search_vector(encoder, q, k)] ==
        [engine.records.shard_ids[sh][r] for sh, r in zip(*engine.shards.split(raw.search(q[None], k)[1][0]))]
        for q in queries[:50])
    return {"raw_qps": nq / best_raw, "engine_qps": nq / best_eng, "ratio": best_raw / best_eng,
            "raw_p50_ms": float(np.median(t_raw)) * 1e3, "engine_p50_ms": float(np.median(t_eng)) * 1e3,
            "identical_top20_first50": same, "n": len(vecs)}


# -- scale -----------------------------------------------------------------------------------------
def synthetic(n: int, dim: int, rng, latent: int = 64, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """Unit vectors with a low intrinsic dimension, like real embeddings: a fixed random linear map of
    ``latent``-d Gaussians into ``dim`` dimensions, plus isotropic noise of relative norm ``noise``."""
    out = np.empty((n, dim), dtype=np.float32)
    a = 0
    for block in synthetic_blocks(n, dim, rng, latent, noise, seed):
        out[a:a + len(block)] = block
        a += len(block)
    return out


def synthetic_blocks(n: int, dim: int, rng, latent: int = 64, noise: float = 0.1, seed: int = 0, block: int = 100_000):
    """``synthetic``'s vectors (the same ones, for the same ``rng``), ``block`` rows at a time: collections
    larger than RAM (10M x 512-d float32 = 20 GB)."""
    w = np.random.default_rng(seed).standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
    for a in range(0, n, block):
        b = min(n, a + block)
        z = rng.standard_normal((b - a, latent)).astype(np.float32) @ w
        z = unit(z) + noise * rng.standard_normal((b - a, dim)).astype(np.float32) / np.sqrt(dim)
        yield unit(z).astype(np.float32)


def run_scale(n: int, dim: int, work: Path, nq: int = 500, shard_size: int = 1_000_000, requested: str = "auto"):
    import faiss

    from indexer.index_types import choose_index_type, new_index, train
    from retrieval.engine.engine import Engine

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    faiss.omp_set_num_threads(os.cpu_count() or 1)     # build with every core ...
    vecs = synthetic(n, dim, rng)
    queries = synthetic(nq, dim, np.random.default_rng(99))
    choice = choose_index_type(n, dim, requested=requested, shard_size=shard_size)
    index_dir = work / "scale-index"
    shards = []
    build_s = 0.0
    for s, a in enumerate(range(0, n, shard_size)):
        b = min(n, a + shard_size)
        tb = time.perf_counter()
        index = new_index(choice.factory, dim)
        if not index.is_trained:
            train(index, vecs[a:b][:200_000])
        index.add(vecs[a:b])
        build_s += time.perf_counter() - tb
        name = store.shard_name(s)
        vector_files.write_vectors(index_dir, "synthetic", name, index)
        store.write_metadata(index_dir, name, [{"id": store.int_to_id(i), "source": f"s{i}"} for i in range(a, b)])
        shards.append(store.ShardEntry(name, b - a))
        del index
    store.write_manifest(index_dir, store.Manifest(
        encoders={"synthetic": store.EncoderEntry("synthetic", dim, index_type=choice.index_type,
                                                  factory=choice.factory)}, shards=shards))
    exact = faiss.IndexFlatIP(dim)
    exact.add(vecs)
    _, truth = exact.search(queries, 10)
    del exact
    faiss.omp_set_num_threads(1)                        # ... search as `loupe serve` does
    print(f"scale: built {choice.factory} over {n:,} vectors in {build_s:.0f} s", flush=True)
    disk = sum(store.vectors_path(index_dir, "synthetic", s.name).stat().st_size for s in shards)
    rss0 = rss_mb()
    engine = Engine(index_dir, device="cpu")
    rss_open = rss_mb() - rss0
    rows = []
    sweep = [None] if choice.index_type == "flat" else ([{"efSearch": e} for e in (32, 64, 128, 256)]
                                                        if choice.index_type == "hnsw"
                                                        else [{"nprobe": p} for p in (8, 16, 32, 64)])
    for params in sweep:
        lat, recall = [], []
        for q, t in zip(queries, truth):
            t1 = time.perf_counter()
            hits = engine.search_vector("synthetic", q, 10, params=params)
            lat.append(time.perf_counter() - t1)
            got = {engine.records.offsets[h.shard] + h.row for h in hits}
            recall.append(len(got & set(t.tolist())) / 10)
        rows.append({"params": params or {}, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                     "recall@10": float(np.mean(recall))})
    return {"n": n, "dim": dim, "index_type": choice.index_type, "factory": choice.factory,
            "shards": len(shards), "build_s": build_s, "total_s": time.perf_counter() - t0,
            "disk_bytes_per_vector": disk / n, "rss_mb_after_open": rss_open,
            "ram_bytes_per_vector": rss_open * 2**20 / n, "open_s": engine.open_seconds, "sweep": rows,
            "default_params": {"efSearch": "max(128, 2k)", "nprobe": 32}}


# -- report ----------------------------------------------------------------------------------------
def report(args, load, seq, ovh, scale) -> str:
    lines = ["# Server and engine benchmark (`benchmarks/bench_server.py`)", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {machine()}",
             f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`", ""]
    if load:
        lines += [f"## Load: {args.clients} clients × {load['seconds']:.0f} s, mixed text/image, "
                  f"{args.n:,}-image index ({args.encoder}, {args.load_shards} flat shard(s)), "
                  f"waitress {args.threads} threads", "",
                  "| requests | QPS | p50 ms | p99 ms | non-2xx | text p50 ms | image p50 ms | encoder p50 ms |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| {load['requests']} ({load['n_text']} text, {load['n_image']} image) | {load['qps']:.1f} | "
                  f"{load['p50_ms']:.1f} | {load['p99_ms']:.1f} | {load['non_2xx']} | {load['text_p50_ms']:.1f} | "
                  f"{load['image_p50_ms']:.1f} | {load['embed_p50_ms']:.1f} |", ""]
    if seq:
        lines += ["## HTTP overhead (1 client, sequential)", "",
                  f"- HTTP latency minus encoder time (text queries): p50 {seq['http_minus_encoder_p50_ms']:.2f} ms, "
                  f"p99 {seq['http_minus_encoder_p99_ms']:.2f} ms",
                  f"- raw-vector query over HTTP (no encoder): p50 {seq['vector_http_p50_ms']:.2f} ms", ""]
    if ovh:
        lines += ["## Engine vs raw FAISS (same vectors, same queries, 1 query per call, k=20, single thread; "
                  "QPS = 1 / median latency, raw and engine interleaved query by query)", "",
                  f"- {ovh['n']:,} vectors: raw IndexFlatIP {ovh['raw_qps']:.0f} QPS (p50 {ovh['raw_p50_ms']:.3f} ms), "
                  f"Engine.search_vector ({args.load_shards} mmap shard(s), ResultHeap merge) "
                  f"{ovh['engine_qps']:.0f} QPS (p50 {ovh['engine_p50_ms']:.3f} ms) → ratio **{ovh['ratio']:.2f}**; "
                  f"identical top-20: {ovh['identical_top20_first50']}", ""]
    if scale:
        lines += [f"## Scale: {scale['n']:,} synthetic {scale['dim']}-d vectors (intrinsic dim 64 + noise), "
                  f"{args.scale_index_type} → `{scale['factory']}` ({scale['index_type']}), "
                  f"{scale['shards']} shard(s)", "",
                  f"- build {scale['build_s']:.0f} s; open {scale['open_s']:.2f} s; disk "
                  f"{scale['disk_bytes_per_vector']:.0f} B/vector; resident after open "
                  f"{scale['ram_bytes_per_vector']:.0f} B/vector ({scale['rss_mb_after_open']:.0f} MB)", "",
                  "| params | p50 ms | p99 ms | recall@10 |", "|---|---|---|---|"]
        for r in scale["sweep"]:
            lines.append(f"| {json.dumps(r['params'])} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                         f"{r['recall@10']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--encoder", default="conse-effnet-lite0")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--scale-n", type=int, default=1_000_000)
    p.add_argument("--scale-dim", type=int, default=512)
    p.add_argument("--scale-index-type", default="auto", help="auto (default) | flat | hnsw | ivfpq")
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--skip-http", action="store_true", help="build the load index, measure engine vs FAISS only")
    p.add_argument("--work", default=None, help="working folder (default: a temp dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "server.md"))
    p.add_argument("--json", default=None, help="also write the raw figures as JSON here")
    p.add_argument("--load-shards", type=int, default=1,
                   help="shards of the load index (the indexer's default shard size is 100k: 10k = 1 shard)")
    args = p.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)   # as `loupe serve` does; raw FAISS and the engine alike
    work = Path(args.work or tempfile.mkdtemp(prefix="loupe-bench-server-"))
    load = seq = ovh = scale = None
    if not args.skip_load:
        index_dir, uploads = build_load_index(work / "load", args.n, args.encoder, args.load_shards)
        ovh = engine_vs_faiss(index_dir, args.encoder)
        print("engine vs faiss:", ovh, flush=True)
    if not args.skip_load and not args.skip_http:
        port = free_port()
        server = start_server(index_dir, port, args.threads)
        try:
            run_load(port, 3, args.clients, uploads)      # warm-up
            load = run_load(port, args.seconds, args.clients, uploads)
            print("load:", load, flush=True)
            seq = run_sequential_overhead(port, 200, store.read_manifest(index_dir).encoders[args.encoder].dim)
            print("sequential:", seq, flush=True)
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    if not args.skip_scale:
        scale = run_scale(args.scale_n, args.scale_dim, work, requested=args.scale_index_type)
        print("scale:", json.dumps(scale), flush=True)
    text = report(args, load, seq, ovh, scale)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "sequential": seq, "overhead": ovh, "scale": scale},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
