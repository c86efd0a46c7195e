"""Whole-index de-duplication that is right by default: candidates from the index's vectors, a
copy-specific check decides (what ``loupe dedup`` and ``POST /api/duplicates`` run).

1. **Candidates**: each image's ``k`` nearest neighbours in the chosen encoder's space with similarity
   >= a loose per-encoder threshold (``CANDIDATE_THRESHOLDS``). A copy resized to 50 % and re-encoded
   scores as low as 0.60 with effnet-lite0 while different pictures that look alike reach 0.90+, so
   this stage only gathers pairs worth a closer look.
2. **Copy check** of every candidate pair, first that holds wins:
   * ``sscd``: the pair's SSCD cosine when the index has ``sscd`` (a copy-detection descriptor);
   * ``pdq``: PDQ hashes (stored when the index has ``pdq``, else computed from the source files);
   * ``aligned``: :func:`retrieval.copydetect.check.aligned_correlation` of the two source files'
     thumbnails (one inside the other at the best scale and offset): catches crops, which PDQ misses.
   A pair whose files cannot be read falls back to its vector similarity at the encoder's strict
   threshold (``DEDUP_THRESHOLDS``); ``--threshold X`` also accepts every pair scoring >= X.

**At scale** (``candidates``): exact all-pairs search grows as N^2 (70,000 images: 270 s on a 2-core box).
From ``SCALE_MIN`` images on (``candidates="auto"``), or always with ``candidates="index"``, the candidates
are instead each image's ``k`` nearest neighbours by the index's own search — the optimized layout of
``loupe optimize`` (plus the delta shards written since), or exact search on the GPU when the engine has one
(``--device cuda``) — queried in batches, memory linear in N; then the same threshold and the same checks.
Without a layout or GPU, ``auto`` stays exact and says so in the summary (``candidates_from``); ``index``
is then an error that says to run ``loupe optimize``.

Thresholds were calibrated on the Tux Paint stamps of ``benchmarks/bench_copydetect.py``'s reference
split with planted resized / re-encoded / cropped copies (``benchmarks/bench_dedup.py --calibrate``)
and judged on pictures it never saw (see ``benchmarks/RESULTS.md``, issue 16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from retrieval.copydetect.check import PixelCache, aligned_correlation, pdq_similarity
from retrieval.copydetect.dedup import (
    DedupConfig,
    DedupResult,
    Pairs,
    deduplicate,
    default_dedup_threshold,
)
from retrieval.errors import InvalidQueryError

# Loose similarity at which a neighbour becomes a candidate (effnet-lite0: the lowest planted resized
# copy scored 0.60 in the calibration set; PDQ: Hamming <= 80 of 256).
CANDIDATE_THRESHOLDS: dict[str, float] = {"effnet-lite0": 0.6, "conse-effnet-lite0": 0.6, "sscd": 0.3,
                                          "pdq": 0.375, "*": 0.6}
PDQ_THRESHOLD = 0.8        # 1 - 2h/256 >= 0.8 <=> Hamming <= 25 (Meta's PDQ match threshold is 31)
ALIGN_THRESHOLD = 0.96     # aligned thumbnail correlation (calibrated: see the module docstring)
# Pictures both smaller than the 64-pixel thumbnail (Fashion-MNIST's 28 x 28) carry no detail beyond
# their silhouette, and different ones correlate up to ~0.98: they need a closer alignment. Set after the
# Fashion-MNIST judging run (benchmarks/RESULTS.md, issue 16), so not held out from it.
ALIGN_THRESHOLD_SMALL = 0.99
SMALL_SIDE = 64
SSCD_THRESHOLD = 0.82      # SSCD cosine (benchmarks/bench_copydetect.py: ~90 % precision raw)
CHECKS = ("pixels", "none")
CANDIDATE_SOURCES = ("auto", "exact", "index")
# From this many images, candidates come from the index's k-NN search (auto). Measured at 100,000 x 128-d
# with 1,000 planted copies (benchmarks/RESULTS.md): exact range search 235 s, the HNSW layout's k-NN 337 s;
# exact grows as N^2, the k-NN search about as N, so they cross near 150,000.
SCALE_MIN = 200_000


@dataclass
class CopyCheckConfig:
    check: str = "pixels"                    # pixels: candidates + copy check; none: vector threshold only
    threshold: float | None = None           # also accept pairs with vector similarity >= this
    candidate_threshold: float | None = None  # None: CANDIDATE_THRESHOLDS per encoder
    k: int = 10                              # candidate neighbours per image
    pdq_threshold: float = PDQ_THRESHOLD
    align_threshold: float = ALIGN_THRESHOLD
    align_threshold_small: float = ALIGN_THRESHOLD_SMALL   # both pictures under SMALL_SIDE pixels
    sscd_threshold: float = SSCD_THRESHOLD
    batch_size: int = 4096
    method: str = "range"                    # for check="none": range | knn (as DedupConfig)
    candidates: str = "auto"                 # auto | exact | index (see the module docstring)

    def __post_init__(self):
        if self.check not in CHECKS:
            raise InvalidQueryError(f"dedup check must be one of {', '.join(CHECKS)}, not {self.check!r}")
        if self.candidates not in CANDIDATE_SOURCES:
            raise InvalidQueryError(f"dedup candidates must be one of {', '.join(CANDIDATE_SOURCES)}, "
                                    f"not {self.candidates!r}")
        if self.k < 1:
            raise InvalidQueryError("dedup k must be positive")

    def candidate(self, encoder: str) -> float:
        if self.candidate_threshold is not None:
            return float(self.candidate_threshold)
        return CANDIDATE_THRESHOLDS.get(encoder, CANDIDATE_THRESHOLDS["*"])


def _vector_blocks(engine, name: str):
    from retrieval.copydetect.match import _is_binary_encoder, binary_blocks

    blocks, ids = [], []
    source = binary_blocks(engine, name) if _is_binary_encoder(engine, name) else engine.all_vectors(name)
    for _, vecs, vids in source:
        blocks.append(vecs)
        ids.extend(vids)
    return blocks, ids


def index_search(engine, name: str):
    """A batched k-NN search of the whole collection of ``name`` through what the engine searches with —
    ``(search_fn, source)`` with source ``gpu`` (exact, torch) or ``layout`` (the optimized layout + the delta
    shards) — or ``(None, reason)`` when the engine has neither."""
    from retrieval.index.shards import make_params, merge_topk, search_index

    shards = engine.shards
    accelerated = shards.accelerated.get(name)
    if accelerated is not None:
        return (lambda q, k: accelerated.search(q, k, None)), "gpu"
    layout = shards.layouts.get(name)
    if layout is None:
        return None, "no optimized layout (run `loupe optimize`)"
    indexes = shards.indexes[name]
    delta = [i for i, index in enumerate(indexes) if index.ntotal and i not in layout.covered]

    def search(q: np.ndarray, k: int):
        parts, offsets = [layout.search(q, k)], [0]          # rows come back global; tuned parameters
        for i in delta:
            shards.check_mapped(name, i)
            parts.append(search_index(indexes[i], q, k, make_params(indexes[i], None, None, k)))
            offsets.append(int(shards.offsets[i]))
        if len(parts) == 1:
            return parts[0]
        return merge_topk(parts, offsets, len(q), k)

    return search, "layout"


def _candidate_search(engine, name: str, n: int, config: CopyCheckConfig):
    """(search or None, what the candidates come from) for ``dedup_index``."""
    if config.candidates == "exact" or (config.candidates == "auto" and n < SCALE_MIN):
        return None, "exact"
    search, source = index_search(engine, name)
    if search is None:
        if config.candidates == "index":
            raise InvalidQueryError(f"dedup from the index's k-NN search needs {source} for {name}, "
                                    f"or --device cuda")
        return None, f"exact ({source})"
    return search, source


class PairChecker:
    """Decides candidate pairs of an engine's images (see the module docstring); counts what decided."""

    def __init__(self, engine, name: str, config: CopyCheckConfig, *, load: Callable[[str], Any] | None = None):
        self.engine, self.name, self.config = engine, name, config
        encoders = engine.manifest.encoders
        self.pixels = PixelCache(load or engine.load_image, pdq="pdq" not in encoders)
        self.stored_pdq: dict[str, np.ndarray] | None = None
        if "pdq" in encoders:
            from retrieval.copydetect.match import _all_codes

            codes, ids = _all_codes(engine, "pdq")
            bits = np.unpackbits(codes, axis=1).astype(bool)
            self.stored_pdq = dict(zip(ids, bits))
        self.use_sscd = "sscd" in encoders
        self.fallback = default_dedup_threshold(name)
        self.counts = {"sscd": 0, "pdq": 0, "aligned": 0, "vectors": 0, "unreadable": 0, "rejected": 0}

    def _pdq(self, image_id: str, pix) -> np.ndarray | None:
        if self.stored_pdq is not None:
            return self.stored_pdq.get(image_id)
        return None if pix is None else pix[1]

    def decide(self, a: str, b: str, score: float) -> str | None:
        """The check that found ``a``/``b`` to be copies (sscd, pdq, aligned, vectors), or None."""
        cfg = self.config
        if cfg.threshold is not None and score >= cfg.threshold:
            return self._count("vectors")
        if self.use_sscd:
            s = score if self.name == "sscd" else float(np.dot(self.engine.stored_vector("sscd", a),
                                                               self.engine.stored_vector("sscd", b)))
            if s >= cfg.sscd_threshold:
                return self._count("sscd")
        pa, pb = self.pixels.get(a), self.pixels.get(b)
        ha, hb = self._pdq(a, pa), self._pdq(b, pb)
        if ha is not None and hb is not None and pdq_similarity(ha, hb) >= cfg.pdq_threshold:
            return self._count("pdq")
        if pa is None or pb is None:
            self.counts["unreadable"] += 1
            return self._count("vectors") if score >= self.fallback else None
        if aligned_correlation(pa[0], pb[0]) >= self.align_threshold(pa[0], pb[0]):
            return self._count("aligned")
        self.counts["rejected"] += 1
        return None

    def align_threshold(self, ta, tb) -> float:
        small = max(ta.side, tb.side) < SMALL_SIDE
        return self.config.align_threshold_small if small else self.config.align_threshold

    def evidence(self, a: str, b: str) -> dict[str, float | None]:
        """Every check's score for a pair (None where it cannot be had), for calibration."""
        pa, pb = self.pixels.get(a), self.pixels.get(b)
        ha, hb = self._pdq(a, pa), self._pdq(b, pb)
        sscd = None
        if self.use_sscd:
            sscd = float(np.dot(self.engine.stored_vector("sscd", a), self.engine.stored_vector("sscd", b)))
        return {"pdq": None if ha is None or hb is None else pdq_similarity(ha, hb),
                "aligned": None if pa is None or pb is None else aligned_correlation(pa[0], pb[0]),
                "sscd": sscd}

    def _count(self, what: str) -> str:
        self.counts[what] += 1
        return what


def dedup_index(engine, encoder: str | None = None, config: CopyCheckConfig | None = None, *,
                metadata_rows=None, progress=None) -> DedupResult:
    """Near-duplicate pairs and groups of a whole index (``engine``), checked as the module says."""
    from retrieval.copydetect.match import choose_encoder

    config = config or CopyCheckConfig()
    name = choose_encoder(engine, encoder)
    blocks, ids = _vector_blocks(engine, name)
    search, source = _candidate_search(engine, name, len(ids), config)
    if config.check == "none":
        thr = default_dedup_threshold(name) if config.threshold is None else config.threshold
        dcfg = DedupConfig(threshold=thr, method=config.method, k=config.k, batch_size=config.batch_size)
        result = deduplicate(blocks, ids, dcfg, metadata_rows=metadata_rows, progress=progress, search=search)
        result.stats.update({"encoder": name, "check": "none", "candidates_from": source})
        return result
    checker = PairChecker(engine, name, config)
    t0 = time.perf_counter()

    def decide(ids_used: list[str], pairs: Pairs) -> Pairs:
        keep = np.zeros(len(pairs), bool)
        how: list[str] = []
        for i, (a, b, s) in enumerate(zip(pairs.a.tolist(), pairs.b.tolist(), pairs.score.tolist())):
            found = checker.decide(ids_used[a], ids_used[b], float(s))
            if found is not None:
                keep[i] = True
                how.append(found)
        return Pairs(pairs.a[keep], pairs.b[keep], pairs.score[keep], checks=how)

    dcfg = DedupConfig(threshold=min(config.candidate(name), config.threshold if config.threshold is not None
                                     else 1.0),
                       method="knn", k=config.k, batch_size=config.batch_size)
    result = deduplicate(blocks, ids, dcfg, metadata_rows=metadata_rows, progress=progress, decide=decide,
                         search=search)
    result.stats.update({"encoder": name, "check": "pixels", "candidate_threshold": dcfg.threshold,
                         "candidates_from": source,
                         "candidates": result.stats.pop("candidates", None),
                         "decided_by": {k: v for k, v in checker.counts.items() if v},
                         "check_seconds": round(time.perf_counter() - t0, 3)})
    result.stats.pop("threshold", None)
    return result


def describe_files(engine, result: DedupResult) -> None:
    """Fill ``result.paths`` (row -> file) and ``result.keep_order`` for the rows in pairs, from the
    index metadata, so the output names files and can say which to remove."""
    rows = sorted({*result.pairs.a.tolist(), *result.pairs.b.tolist()})
    for row in rows:
        try:
            meta = engine.metadata(result.ids[row])
        except Exception:  # noqa: BLE001 - an id without metadata: named by its id only
            meta = {}
        result.files[row] = {"path": meta.get("path") or meta.get("source"), "width": meta.get("width"),
                             "height": meta.get("height"), "size": meta.get("size"), "mtime": meta.get("mtime")}


__all__ = ["CopyCheckConfig", "PairChecker", "dedup_index", "describe_files", "CANDIDATE_THRESHOLDS"]
