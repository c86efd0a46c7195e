"""Re-ranker configuration: the knobs of ``retrieval.rerank`` (``RerankConfig``) and the two default sets
``Engine.search(rerank=True)`` picks from: ``DEFAULT_CONFIG`` for the coarse local map and
``FINE_DEFAULT_CONFIG`` for an index built with ``--local-layer fine``.
See ``retrieval.rerank``'s docstring for what each term of the fused score means.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class RerankConfig:
    """Knobs of the re-ranker (defaults tuned on benchmarks/bench_rerank.py, effnet-lite0)."""

    n_candidates: int = 100        # re-rank this many global candidates
    local: bool = True             # MaxSim local score
    spatial: bool = True           # RANSAC spatial verification
    qe: bool = False               # α-query expansion over the re-ranked shortlist
    dba: bool = False              # database-side augmentation within the shortlist
    w_local: float = 2.0
    w_spatial: float = 0.1
    w_text: float = 0.5
    matching: str = "mutual"       # "mutual": mutual nearest neighbours; "nn": every query token's nearest
    min_match_sim: float = 0.0     # matches below this similarity are dropped
    local_norm_pct: float | None = 80.0   # per-token background percentile over the shortlist (None: off)
    min_inliers: int = 5
    min_inlier_ratio: float = 0.2  # ... and at least this fraction of the mutual-NN matches
    inlier_cap: int = 10
    ransac_iters: int = 512
    ransac_threshold: float = 1.0  # residual threshold, in cells of the candidate's grid
    max_scale: float = 4.0
    max_aspect: float = 3.0
    allow_reflection: bool = False
    seed: int = 0
    qe_k: int = 2
    qe_alpha: float = 3.0
    dba_k: int = 2
    dba_alpha: float = 3.0
    text_top_frac: float = 0.125
    spatial_top: int | None = 20    # RANSAC only for this many candidates (by the score without it); None: all
    regions: bool = True           # multi-region query descriptors (see region_vectors)
    w_region: float = 1.0
    region_sizes: tuple[int, ...] = (2, 3, 4, 5)   # window sides, in grid cells
    region_stride: int = 1
    region_expand: int = 0         # each region also fetches its own top-k candidates (0: rescore only)
    crop: bool = True              # query-crop second pass (see crop_windows / grid_box_to_pixels)
    crop_fuse: str = "max"         # "max": the region term becomes w_region·max(region, crop); "sum": + w_crop·crop
    w_crop: float = 1.0            # only with crop_fuse="sum"
    crop_count: int = 1            # crop this many query windows (one batched forward pass)
    crop_select: str = "match"     # "match" | "gain" | "novel": how the windows to crop are chosen
    crop_margin: float = 1.0       # cells added on every side of the window before cropping
    crop_expand: int = 0           # each crop vector also fetches its own top-k candidates (0: rescore only)


DEFAULT_CONFIG = RerankConfig()
# An index whose local descriptors are the fine map (``loupe index --local-layer fine``): 4x the cells, so
# local matching alone lifts crops and rotations as far as the crop pass and RANSAC did on the coarse map,
# and those two would take the latency past 3x global search (benchmarks/results/rerank.md).
FINE_DEFAULT_CONFIG = replace(DEFAULT_CONFIG, crop=False, spatial=False, w_local=4.0)
