"""Whole-collection near-duplicate detection: all pairs above a threshold, and their groups.

Pure functions over arrays; reading an index is done by the caller (``loupe dedup`` reads shards
through ``Engine.all_vectors``) and passed in as a list of blocks (one per shard).

* Float vectors (unit rows, inner product = cosine): FAISS ``range_search`` of every block against
  every other block, ``batch_size`` query rows at a time. Work is O(N^2 d) like any exact all-pairs
  search, but memory is the vectors themselves plus the pairs found: no N x N matrix is ever formed.
  ``method="knn"`` instead keeps at most ``k`` neighbours per image (a k-NN graph, memory N*k even
  when a threshold is too low and "everything matches everything").
* Binary codes (PDQ, packed uint8 [n, nbits/8]): the same with ``faiss.IndexBinaryFlat`` and Hamming
  distance. A Hamming distance h is reported as the score ``1 - 2 h / nbits`` (the cosine of the
  ±1 vectors), so one threshold scale serves both kinds.
* At scale (``knn_pairs``): each image's ``k`` nearest neighbours from a search function (the index's
  optimized layout, or exact search on a GPU; :mod:`retrieval.copydetect.collection` chooses), queried in
  batches, then the same threshold: work ~N log N or N on a GPU, memory linear in N (at most N*k pairs).
* Groups are the connected components of the pair graph (``scipy.sparse.csgraph``), size >= 2.
* Exact duplicates (same SHA-256) are found from the metadata, without embedding anything twice.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from retrieval.errors import InvalidQueryError
from retrieval.numeric import hamming_to_score, score_to_max_hamming

Progress = Callable[[int], None]  # called with the number of query rows just processed
# (queries [m, d] float32, k) -> (scores [m, k], global rows [m, k], -1 = none): a k-NN search of the collection
SearchFn = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]

DEFAULT_THRESHOLD = 0.95           # cosine; for PDQ 0.95 <=> Hamming distance <= 6 of 256 bits
# Per-encoder defaults for `loupe dedup` (raw similarity at which a top match was a true copy about
# 90 % of the time on benchmarks/bench_copydetect.py; see benchmarks/results/copydetect.md).
# PDQ: 0.758 = Hamming distance <= 31 of 256 bits, the threshold Meta recommends for PDQ matching
# (the benchmark's 90 %-precision point, 0.64, is looser than a collection dedup wants).
DEDUP_THRESHOLDS: dict[str, float] = {"effnet-lite0": 0.94, "sscd": 0.82, "pdq": 0.758}


def default_dedup_threshold(encoder: str | None) -> float:
    return DEDUP_THRESHOLDS.get(encoder or "", DEFAULT_THRESHOLD)


@dataclass
class DedupConfig:
    threshold: float = DEFAULT_THRESHOLD   # keep pairs with score >= threshold
    method: str = "range"                   # range (exact, all pairs) | knn (at most k per image)
    k: int = 32                             # neighbours per image for method="knn"
    batch_size: int = 4096                  # query rows per FAISS call

    def __post_init__(self):
        if self.method not in ("range", "knn"):
            raise InvalidQueryError(f"dedup method must be 'range' or 'knn', not {self.method!r}")
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise InvalidQueryError(f"dedup threshold must be a similarity in [-1, 1], not {self.threshold}")
        if self.k < 1 or self.batch_size < 1:
            raise InvalidQueryError("dedup k and batch_size must be positive")


@dataclass
class Pairs:
    """Pairs of global row numbers ``a < b`` with their similarity, sorted by (a, b)."""

    a: np.ndarray       # int64 [m]
    b: np.ndarray       # int64 [m]
    score: np.ndarray   # float32 [m]
    checks: list[str] | None = None   # per pair, the copy check that accepted it (collection.dedup_index)

    def __len__(self) -> int:
        return len(self.a)

    @classmethod
    def empty(cls) -> "Pairs":
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))

    @classmethod
    def concat(cls, parts: Sequence["Pairs"]) -> "Pairs":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        a = np.concatenate([p.a for p in parts])
        b = np.concatenate([p.b for p in parts])
        s = np.concatenate([p.score for p in parts])
        order = np.lexsort((b, a))
        return cls(a[order], b[order], s[order])

    def as_set(self) -> set[tuple[int, int]]:
        return set(zip(self.a.tolist(), self.b.tolist()))


@dataclass
class DedupResult:
    ids: list[str]                   # global row -> image id
    pairs: Pairs
    groups: list[list[int]]          # connected components (rows), each sorted, largest first
    exact: list[dict[str, Any]] = field(default_factory=list)   # [{"id", "sources": [...]}]
    stats: dict[str, Any] = field(default_factory=dict)
    files: dict[int, dict[str, Any]] = field(default_factory=dict)   # row -> {path, width, height, size, mtime}

    def path(self, row: int) -> str | None:
        return (self.files.get(row) or {}).get("path")

    def keeper(self, group: Sequence[int]) -> int:
        """The row of ``group`` to keep: the largest picture (pixels), then the largest file, then the
        oldest, then the first."""
        def key(row):
            f = self.files.get(row) or {}
            area = (f.get("width") or 0) * (f.get("height") or 0)
            mtime = f.get("mtime")
            return (-area, -(f.get("size") or 0), mtime if mtime is not None else float("inf"), row)
        return min(group, key=key)

    def to_remove(self) -> list[str]:
        """Files to delete so that one copy of each picture is left: in each group every file but
        :meth:`keeper`'s, and every extra source of byte-identical content (imagededup's
        ``find_duplicates_to_remove``). Images known only by id are listed by id."""
        out: list[str] = []
        removed_ids: set[str] = set()
        for g in self.groups:
            keep = self.keeper(g)
            for row in g:
                if row != keep:
                    out.append(self.path(row) or self.ids[row])
                    removed_ids.add(self.ids[row])
        for e in self.exact:
            sources = [str(x) for x in e.get("sources") or []]
            out.extend(sources if e.get("id") in removed_ids else sources[1:])
        return list(dict.fromkeys(x for x in out if x))

    def to_json(self) -> dict[str, Any]:
        ids = self.ids
        checks = self.pairs.checks or [None] * len(self.pairs)
        pairs = []
        for a, b, s, how in zip(self.pairs.a.tolist(), self.pairs.b.tolist(), self.pairs.score.tolist(), checks):
            pair = {"a": ids[a], "b": ids[b], "a_path": self.path(a), "b_path": self.path(b),
                    "score": round(float(s), 6)}
            if how is not None:
                pair["check"] = how
            pairs.append(pair)
        return {
            "pairs": pairs,
            "groups": [[ids[i] for i in g] for g in self.groups],
            "group_paths": [[self.path(i) for i in g] for g in self.groups],
            "exact": self.exact,
            "remove": self.to_remove(),
            "summary": self.summary(),
        }

    def summary(self) -> dict[str, Any]:
        return {"images": len(self.ids), "pairs": len(self.pairs), "groups": len(self.groups),
                "images_in_groups": int(sum(len(g) for g in self.groups)),
                "exact_duplicates": int(sum(len(e["sources"]) - 1 for e in self.exact)), **self.stats}


def is_binary(block: np.ndarray) -> bool:
    return np.asarray(block).dtype == np.uint8


# -- all pairs ----------------------------------------------------------------------------------
def _offsets(blocks: Sequence[np.ndarray]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([len(b) for b in blocks])]).astype(np.int64)


def _make_index(block: np.ndarray, binary: bool):
    import faiss

    if binary:
        index = faiss.IndexBinaryFlat(block.shape[1] * 8)
        index.add(np.ascontiguousarray(block, dtype=np.uint8))
    else:
        index = faiss.IndexFlatIP(block.shape[1])
        index.add(np.ascontiguousarray(block, dtype=np.float32))
    return index


def _range_batch(index, q: np.ndarray, threshold: float, binary: bool, nbits: int):
    """(query row, db row, score) triples with score >= threshold for one query batch."""
    if binary:
        radius = score_to_max_hamming(threshold, nbits) + 1       # faiss keeps distances < radius
        if radius <= 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        lims, dist, labels = index.range_search(np.ascontiguousarray(q, dtype=np.uint8), radius)
        scores = hamming_to_score(dist, nbits)
    else:
        lims, scores, labels = index.range_search(np.ascontiguousarray(q, dtype=np.float32),
                                                  float(threshold) - 1e-6)   # faiss keeps IP > radius
    rows = np.repeat(np.arange(len(q), dtype=np.int64), np.diff(lims).astype(np.int64))
    keep = scores >= np.float32(threshold)
    return rows[keep], labels[keep].astype(np.int64), scores[keep].astype(np.float32)


def _knn_batch(index, q: np.ndarray, threshold: float, k: int, binary: bool, nbits: int):
    kk = min(k + 1, index.ntotal)
    if binary:
        dist, labels = index.search(np.ascontiguousarray(q, dtype=np.uint8), kk)
        scores = hamming_to_score(dist, nbits)
    else:
        scores, labels = index.search(np.ascontiguousarray(q, dtype=np.float32), kk)
    rows = np.repeat(np.arange(len(q), dtype=np.int64), kk)
    scores, labels = scores.ravel(), labels.ravel().astype(np.int64)
    keep = (labels >= 0) & (scores >= np.float32(threshold))
    return rows[keep], labels[keep], scores[keep].astype(np.float32)


def find_pairs(blocks: Sequence[np.ndarray], config: DedupConfig | None = None, *,
               progress: Progress | None = None) -> Pairs:
    """All pairs of rows (global numbering over the concatenated ``blocks``) with score >= threshold.

    ``blocks``: float32 unit rows [n_i, d] or packed binary codes uint8 [n_i, nbits/8] (all the same
    kind). Range mode searches every block against every block at or after it (S(S+1)/2 block pairs,
    each in query batches), so memory never exceeds the vectors, one batch's results and the pairs.
    """
    config = config or DedupConfig()
    blocks = [np.asarray(b) for b in blocks]
    blocks = [b for b in blocks if len(b)] or []
    if not blocks:
        return Pairs.empty()
    binary = is_binary(blocks[0])
    if any(is_binary(b) != binary for b in blocks):
        raise InvalidQueryError("dedup blocks mix binary codes and float vectors")
    nbits = blocks[0].shape[1] * 8 if binary else 0
    offsets = _offsets(blocks)
    n_total = int(offsets[-1])
    found: list[Pairs] = []

    if config.method == "knn":
        # one index over everything is not needed: per-block k-NN, then merge (keep the best k overall)
        rows_all, cols_all, sc_all = [], [], []
        for di, db in enumerate(blocks):
            index = _make_index(db, binary)
            for qi, qb in enumerate(blocks):
                for start in range(0, len(qb), config.batch_size):
                    q = qb[start:start + config.batch_size]
                    r, c, s = _knn_batch(index, q, config.threshold, config.k, binary, nbits)
                    rows_all.append(r + offsets[qi] + start)
                    cols_all.append(c + offsets[di])
                    sc_all.append(s)
                    if progress and di == len(blocks) - 1:
                        progress(len(q))
            del index
        a, b, s = np.concatenate(rows_all), np.concatenate(cols_all), np.concatenate(sc_all)
        # keep each row's k best over all blocks, then make pairs undirected
        keep = a != b
        a, b, s = a[keep], b[keep], s[keep]
        order = np.lexsort((-s, a))
        a, b, s = a[order], b[order], s[order]
        first = np.searchsorted(a, a, side="left")
        rank = np.arange(len(a)) - first
        keep = rank < config.k
        a, b, s = a[keep], b[keep], s[keep]
        lo, hi = np.minimum(a, b), np.maximum(a, b)
        key = lo * max(n_total, 1) + hi
        _, uniq = np.unique(key, return_index=True)
        return Pairs.concat([Pairs(lo[uniq], hi[uniq], s[uniq])])

    for di, db in enumerate(blocks):
        index = _make_index(db, binary)
        for qi in range(di, len(blocks)):
            qb = blocks[qi]
            for start in range(0, len(qb), config.batch_size):
                q = qb[start:start + config.batch_size]
                r, c, s = _range_batch(index, q, config.threshold, binary, nbits)
                ga = r + offsets[qi] + start
                gb = c + offsets[di]
                keep = gb < ga          # each unordered pair once; drops self-matches
                found.append(Pairs(gb[keep], ga[keep], s[keep]))
                if progress:
                    progress(len(q))
        del index
    return Pairs.concat(found)


def knn_pairs(search: SearchFn, blocks: Sequence[np.ndarray], threshold: float, k: int, *,
              batch_size: int = 4096, progress: Progress | None = None) -> Pairs:
    """Pairs (global rows over the concatenated ``blocks``) among each row's ``k`` nearest neighbours by
    ``search`` with score >= ``threshold``. Rows are queried ``batch_size`` at a time; what is kept between
    batches is the pairs found (at most ``n * k``): memory linear in the number of rows. A pair found from
    both ends is kept once, with the larger score (an approximate search may score it differently)."""
    a_parts, b_parts, s_parts = [], [], []
    offset, n_total = 0, sum(len(b) for b in blocks)
    for block in blocks:
        for start in range(0, len(block), batch_size):
            q = np.ascontiguousarray(block[start:start + batch_size], dtype=np.float32)
            scores, rows = search(q, min(k + 1, max(n_total, 1)))
            me = np.arange(offset + start, offset + start + len(q), dtype=np.int64)[:, None]
            keep = (rows >= 0) & (rows != me) & (scores >= np.float32(threshold))
            src = np.broadcast_to(me, rows.shape)[keep]
            dst = rows[keep].astype(np.int64)
            a_parts.append(np.minimum(src, dst))
            b_parts.append(np.maximum(src, dst))
            s_parts.append(scores[keep].astype(np.float32))
            if progress:
                progress(len(q))
        offset += len(block)
    if not a_parts or not sum(len(x) for x in a_parts):
        return Pairs.empty()
    a, b, s = np.concatenate(a_parts), np.concatenate(b_parts), np.concatenate(s_parts)
    order = np.lexsort((-s, b, a))                   # per (a, b): the best score first
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    return Pairs(a[first], b[first], s[first])


def pair_work(blocks: Sequence[np.ndarray], method: str = "range") -> int:
    """Query rows a run will process (the progress bar's total)."""
    sizes = [len(b) for b in blocks if len(b)]
    if method == "knn":
        return sum(sizes)
    return sum(sum(sizes[i:]) for i in range(len(sizes)))


# -- groups -------------------------------------------------------------------------------------
def connected_groups(n: int, pairs: Pairs, *, min_size: int = 2) -> list[list[int]]:
    """Connected components of the pair graph over ``n`` nodes, as sorted row lists, largest first."""
    if n == 0 or len(pairs) == 0:
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs.a, pairs.b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = defaultdict(list)
    in_pairs = np.unique(np.concatenate([pairs.a, pairs.b]))
    for row in in_pairs.tolist():
        members[int(labels[row])].append(row)
    groups = [sorted(m) for m in members.values() if len(m) >= min_size]
    groups.sort(key=lambda g: (-len(g), g[0]))
    return groups


# -- exact duplicates from metadata ---------------------------------------------------------------
def exact_duplicates(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Images whose content is byte-identical, from metadata rows (``id``, ``sha256``, ``source``,
    ``aliases``). The indexer embeds identical content once and lists the other sources as
    ``aliases``; rows sharing a SHA-256 (e.g. across separately built shards) are merged too.
    Returns ``[{"id", "sha256", "sources": [source, ...]}]`` for every content seen more than once."""
    by_hash: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row.get("sha256") or row.get("id")
        entry = by_hash.setdefault(key, {"id": row.get("id"), "sha256": row.get("sha256"), "sources": []})
        sources = [row.get("source") or row.get("path")]
        aliases = row.get("aliases")
        if isinstance(aliases, str) and aliases:
            try:
                aliases = json.loads(aliases)
            except json.JSONDecodeError:
                aliases = [aliases]
        sources += list(aliases or [])
        for s in sources:
            if s is not None and s not in entry["sources"]:
                entry["sources"].append(s)
        entry.setdefault("_rows", 0)
        entry["_rows"] += 1
    out = []
    for entry in by_hash.values():
        rows_seen = entry.pop("_rows")
        if len(entry["sources"]) > 1 or rows_seen > 1:
            out.append(entry)
    out.sort(key=lambda e: (-len(e["sources"]), str(e["id"])))
    return out


# -- the whole job --------------------------------------------------------------------------------
def deduplicate(blocks: Sequence[np.ndarray], ids: Sequence[str], config: DedupConfig | None = None, *,
                metadata_rows: Iterable[dict[str, Any]] | None = None,
                progress: Progress | None = None,
                decide: Callable[[list[str], Pairs], Pairs] | None = None,
                search: SearchFn | None = None) -> DedupResult:
    """Pairs above the threshold, their connected groups and exact duplicates.

    ``blocks`` (one per shard) and ``ids`` (concatenated, one per row) describe the collection. If
    the same id appears on several rows (content stored twice), those rows are reported as exact
    duplicates and only the first is compared. ``decide(ids, candidate_pairs) -> pairs`` (optional)
    keeps the candidate pairs that a copy check accepts (``retrieval.copydetect.collection``). With
    ``search`` (a k-NN search of the same rows), candidates are each row's ``config.k`` neighbours by it
    (``knn_pairs``) instead of an exhaustive comparison.
    """
    import time

    config = config or DedupConfig()
    t0 = time.perf_counter()
    ids = list(ids)
    blocks = [np.asarray(b) for b in blocks]
    all_blocks = blocks
    if sum(len(b) for b in blocks) != len(ids):
        raise InvalidQueryError(f"dedup got {sum(len(b) for b in blocks)} vectors but {len(ids)} ids")
    # rows whose id was already seen: identical content stored twice -> exact, not embedded again
    seen: dict[str, int] = {}
    keep_mask = np.ones(len(ids), bool)
    for i, image_id in enumerate(ids):
        if image_id in seen:
            keep_mask[i] = False
        else:
            seen[image_id] = i
    if not keep_mask.all():
        offsets = _offsets(blocks)
        blocks = [b[keep_mask[offsets[j]:offsets[j + 1]]] for j, b in enumerate(blocks)]
        ids_used = [i for i, k in zip(ids, keep_mask) if k]
    else:
        ids_used = ids
    binary = bool(blocks) and is_binary(blocks[0])
    if search is not None:
        pairs = knn_pairs(search, all_blocks, config.threshold, config.k, batch_size=config.batch_size,
                          progress=progress)
        if not keep_mask.all():                      # rows stored twice: only the first of each is compared
            used = np.cumsum(keep_mask) - 1
            ok = keep_mask[pairs.a] & keep_mask[pairs.b]
            pairs = Pairs.concat([Pairs(used[pairs.a[ok]], used[pairs.b[ok]], pairs.score[ok])])
    else:
        pairs = find_pairs(blocks, config, progress=progress)
    n_candidates = len(pairs)
    if decide is not None:
        pairs = decide(ids_used, pairs)
    groups = connected_groups(len(ids_used), pairs)
    exact = exact_duplicates(metadata_rows) if metadata_rows is not None else []
    if metadata_rows is None and not keep_mask.all():
        dup: dict[str, int] = defaultdict(int)
        for i in ids:
            dup[i] += 1
        exact = [{"id": i, "sha256": None, "sources": [i] * c} for i, c in dup.items() if c > 1]
    stats = {"threshold": float(config.threshold), "method": "knn" if search is not None else config.method,
             "metric": "hamming" if binary else "cosine", "seconds": round(time.perf_counter() - t0, 3)}
    if decide is not None:
        stats["candidates"] = n_candidates
    return DedupResult(ids=ids_used, pairs=pairs, groups=groups, exact=exact, stats=stats)


# -- output -------------------------------------------------------------------------------------
def write_result(result: DedupResult, path: str | Path) -> Path:
    """Write pairs to ``path`` by suffix: ``.json`` (pairs + groups + exact + summary),
    ``.parquet`` / ``.csv`` (one row per pair: a, b, score, group). Groups also go to a sibling
    ``<stem>.groups.json`` for the tabular formats."""
    from retrieval.index.store import atomic_write_json, atomic_write_with

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".json", ""):
        atomic_write_json(path, result.to_json())
        return path
    group_of = {}
    for g_no, g in enumerate(result.groups):
        for row in g:
            group_of[row] = g_no
    a, b = result.pairs.a.tolist(), result.pairs.b.tolist()
    table = {"a": [result.ids[i] for i in a], "b": [result.ids[i] for i in b],
             "score": result.pairs.score.astype(np.float32).tolist(),
             "group": [group_of.get(i, -1) for i in a],
             "a_path": [result.path(i) for i in a], "b_path": [result.path(i) for i in b]}
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        tbl = pa.table({"a": pa.array(table["a"], pa.string()), "b": pa.array(table["b"], pa.string()),
                        "score": pa.array(table["score"], pa.float32()),
                        "group": pa.array(table["group"], pa.int64()),
                        "a_path": pa.array(table["a_path"], pa.string()),
                        "b_path": pa.array(table["b_path"], pa.string())})
        atomic_write_with(path, lambda tmp: pq.write_table(tbl, tmp))
    elif suffix == ".csv":
        import csv

        def _w(tmp):
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["a", "b", "score", "group", "a_path", "b_path"])
                for row in zip(table["a"], table["b"], table["score"], table["group"], table["a_path"],
                               table["b_path"]):
                    w.writerow([row[0], row[1], f"{row[2]:.6f}", row[3], row[4] or "", row[5] or ""])
        atomic_write_with(path, _w)
    else:
        raise InvalidQueryError(f"unknown output format {path.suffix!r}: use .json, .parquet or .csv")
    groups_path = path.with_name(path.stem + ".groups.json")
    atomic_write_json(groups_path, {"groups": [[result.ids[i] for i in g] for g in result.groups],
                                    "group_paths": [[result.path(i) for i in g] for g in result.groups],
                                    "exact": result.exact, "remove": result.to_remove(),
                                    "summary": result.summary()})
    return path
