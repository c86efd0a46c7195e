"""The fused list of a ``regions`` query: the whole picture's list and each region's list in one ranking.

Pure functions over scores, so that a benchmark can replay a rule on saved lists (``bench_regions.py``
chooses the rule on a tuning split and judges it on a held-out one). Inputs:

* ``g``: candidate id → the whole picture's cosine with it (exact, from the stored vector);
* ``global_list``: the whole picture's hits, best first, as ``[(id, score)]``;
* ``region_lists``: per proposed region (in the proposals' order), ``(kind, [(id, score)])``, best first.

Rules (``FuseRule.mode``):

``"gain"``
    ``fused(c) = max(g(c), max_r s_r(c)) + gain * max(0, max_{r: c in top `top` of r} s_r(c) - g(c))``:
    a candidate that a region ranks first and finds better than the whole picture does climbs; the
    background picture scores high in every list but gains nothing. ``kinds`` limits which regions' top
    hits may gain (e.g. segments and salient components only, not windows).
``"rrf"``
    Reciprocal-rank fusion: ``fused(c) = w_global / (K + rank_global(c)) + sum_r 1 / (K + rank_r(c))``
    (ranks from 1; absent: no term): a candidate many lists rank high first, the background included.
``"interleave"``
    Round robin: the whole picture's rank-1 hit, then each region's rank-1 hit (proposal order), then every
    list's rank-2 hit, ...; a candidate already placed is skipped. Score: ``1 / position``.

``fuse(...)`` returns ``[(id, fused score)]``, best first (ties broken by the id's first appearance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

ScoredIds = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class FuseRule:
    mode: str = "gain"
    gain: float = 1.0
    top: int = 1
    kinds: tuple[str, ...] | None = None      # "gain": region kinds whose top hits may gain (None: all)
    k_rrf: float = 60.0
    w_global: float = 1.0                     # "rrf": weight of the whole picture's list

    def __post_init__(self):
        if self.mode not in ("gain", "rrf", "interleave"):
            raise ValueError(f"unknown fusion mode {self.mode!r}: use gain, rrf or interleave")

    def describe(self) -> str:
        if self.mode == "gain":
            kinds = "all regions" if self.kinds is None else "+".join(self.kinds)
            return f"gain {self.gain:g}, top {self.top}, {kinds}"
        if self.mode == "rrf":
            return f"rrf K={self.k_rrf:g}, whole-picture weight {self.w_global:g}"
        return "interleave"


def _order(ids: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(ids)}


def fuse(g: Mapping[str, float], global_list: ScoredIds, region_lists: Sequence[tuple[str, ScoredIds]],
         rule: FuseRule) -> list[tuple[str, float]]:
    """The fused ranking of every candidate of every list (module docstring)."""
    seen: list[str] = []
    for c, _ in list(global_list) + [h for _, hits in region_lists for h in hits]:
        if c not in seen:
            seen.append(c)
    first = _order(seen)
    if rule.mode == "interleave":
        lists = [[c for c, _ in global_list]] + [[c for c, _ in hits] for _, hits in region_lists]
        out: list[str] = []
        for rank in range(max((len(li) for li in lists), default=0)):
            for li in lists:
                if rank < len(li) and li[rank] not in out:
                    out.append(li[rank])
        return [(c, 1.0 / (i + 1)) for i, c in enumerate(out)]
    scores: dict[str, float] = {}
    if rule.mode == "rrf":
        for rank, (c, _) in enumerate(global_list, start=1):
            scores[c] = scores.get(c, 0.0) + rule.w_global / (rule.k_rrf + rank)
        for _, hits in region_lists:
            for rank, (c, _) in enumerate(hits, start=1):
                scores[c] = scores.get(c, 0.0) + 1.0 / (rule.k_rrf + rank)
    else:
        best: dict[str, float] = {}
        top: dict[str, float] = {}
        for kind, hits in region_lists:
            for rank, (c, s) in enumerate(hits):
                best[c] = max(best.get(c, -1e9), float(s))
                if rank < rule.top and (rule.kinds is None or kind in rule.kinds):
                    top[c] = max(top.get(c, -1e9), float(s))
        for c in seen:
            gc = float(g[c])
            scores[c] = max(gc, best.get(c, -1e9)) + rule.gain * max(0.0, top.get(c, -1e9) - gc)
    return sorted(scores.items(), key=lambda t: (-t[1], first[t[0]]))
