"""Searching by region: a box of the query, the query's proposed regions, and the region index.

* ``box_request``: a request with ``box`` becomes the same request on the cropped picture, so the box is
  searched as its own query and local-feature re-ranking sees only the box.
* ``search_regions`` (``regions=True``): the whole picture is searched as usual (an indexed picture's feature
  map is read from the region index, ``views.py``, not computed again); its regions
  (``retrieval.regions.proposals``; the residual region against the pictures of its top hits,
  ``explaining_pictures``) are cropped, embedded in one batch and searched each (same filter and parameters).
  The top-level list is the fused list (``retrieval.regions.fusion``, rule ``FUSE_RULE``).
* ``merge_region_hits``: on an index with a region index, a query's hits are merged with its best
  region hits (an image scores its better of the two; when a region wins, the hit carries its ``box``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.encoders.passes import Handoff, side_by_side, width
from retrieval.errors import InvalidQueryError, LoupeError
from retrieval.regions.box import check_box_in_image, crop_to_box, full_size
from retrieval.regions.fusion import FuseRule, fuse
from retrieval.regions.proposals import (
    DEFAULT_PROPOSALS,
    ProposalConfig,
    QueryParts,
    Region,
    explain_query,
    masks_from_segmentations,
    propose_regions,
    regions_from_parts,
    segment_jobs,
    work_picture,
    work_size,
)
from retrieval.regions.saliency import canvas_tokens, saliency_map, work_shape
from retrieval.types import Hit

FUSE_RULE = FuseRule("gain", gain=2.0, top=1)     # the fused list's rule (``fusion.py``): bench_regions.py's choice
CROP_JITTER = (0.0,)   # a region's vector: the mean of its crops grown by these fractions of its sides (0: the box)


@dataclass
class RegionHit(Hit):
    """A hit found through a region of the indexed picture: ``box`` (x0, y0, x1, y1) in its pixels."""

    box: tuple[int, int, int, int] | None = None


@dataclass
class RegionResult:
    """One proposed region of the query and its own results."""

    region: Region
    hits: list[Hit]

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.region.box


@dataclass
class RegionSearch:
    regions: list[RegionResult] = field(default_factory=list)
    size: tuple[int, int] | None = None          # the query picture's (width, height): the boxes' frame


# -- a box -----------------------------------------------------------------------------------------
def query_picture(engine, req):
    """The query picture (decoded, upright) and the size its pixels are counted in (the original's)."""
    from retrieval.engine.embed import upload_side
    from retrieval.images import load_image

    if req.image is None:
        image = engine.load_image(req.image_id)
        return image, image.size
    entry = engine.embedder.route(req)
    image = load_image(req.image, min_side=upload_side(entry.name))
    return image, full_size(req.image) or image.size


def box_request(engine, req):
    """``req`` with its ``box``: the same request on the cropped picture; raises ``InvalidQueryError`` when
    the box is not inside the picture. Returns ``(request, box)``."""
    image, size = query_picture(engine, req)
    box = check_box_in_image(req.box, size)
    crop = crop_to_box(image, box, size)
    return req.replace(image=crop, image_id=None, box=None), tuple(int(round(v)) for v in box)


# -- regions of the query --------------------------------------------------------------------------
def search_regions(engine, req, *, config: ProposalConfig | None = None):
    """``regions=True``: the global response with ``response.regions`` (a ``RegionSearch``) and its hits
    replaced by the fused list (module docstring); ``config``: the proposals' (default ``DEFAULT_PROPOSALS``)."""
    config = config or DEFAULT_PROPOSALS
    t0 = time.perf_counter()
    base, view, parts = _whole_picture(engine, req.replace(regions=False), config)
    ctx = base.query
    image = ctx.get_image()
    if image is None:
        raise InvalidQueryError("regions needs an image query (image or image_id)")
    t1 = time.perf_counter()
    enc = engine.encoder(ctx.encoder)
    if parts is not None and parts.work.size == work_size(image.size):
        regions = regions_from_parts(image, parts, config)
    else:
        regions = propose_regions(image, enc, config,
                                  explaining_pictures(engine, base.hits, ctx.image_id, config, ctx.encoder), view=view)
    t2 = time.perf_counter()
    result = RegionSearch(size=image.size)
    if regions:
        vectors = embed_regions(enc, image, [r.box for r in regions])
        for region, vec in zip(regions, vectors):   # each region as its own query (a vector query)
            hits = engine.search(vector=vec, encoder=ctx.encoder, k=req.k, params=req.params, filter=req.filter).hits
            result.regions.append(RegionResult(region, hits))
    t3 = time.perf_counter()
    if req.image is not None and image.size != (full_size(req.image) or image.size):
        # an upload decoded reduced: boxes in pixels of the original
        result = _rescale(result, image.size, full_size(req.image))
    base.hits = fuse_region_hits(engine, ctx.encoder, ctx.vector, base.hits, result.regions, req.k)
    base.regions = result
    base.score_kind = "regions"          # retrieval.engine.query.SCORE_KINDS: may exceed 1
    base.timings.update(proposals_ms=(t2 - t1) * 1e3, regions_ms=(t3 - t2) * 1e3)
    base.took_ms = (time.perf_counter() - t0) * 1e3
    return base


def _whole_picture(engine, req, config: ProposalConfig):
    """The whole picture's search and what the proposals need of the query (``proposals.QueryParts``),
    computed side by side where the CPU has room (``retrieval.encoders.passes``), in this order: the search;
    the feature map (``saliency.canvas_tokens`` of the work picture) and the saliency map it gives; the
    selective-search segmentations (``proposals.segment_jobs``, one call per colour space: no encoder pass,
    so each fills a core as soon as a pass leaves it); last, the explanation of the query's background by
    its top hits (``proposals.explain_query``: it waits for the search and the map, which started first).
    Returns ``(response, map, parts)``: an indexed picture's stored map (``views.py``) is used as it is and
    then no parts are computed here (``propose_regions`` does the rest); parts None also when the proposals
    need no map or the picture cannot be read."""
    if req.image is None and req.image_id is None:
        return engine.search(req), None, None
    name = engine.embedder.route(req).name
    view = stored_view(engine, name, req.image_id)     # an indexed picture's map: no encoder pass
    if view is not None or (config.w_feature <= 0 and config.residual is None):
        return engine.search(req), view, None
    enc = engine.encoder(name)
    try:
        work = work_picture(query_picture(engine, req)[0])
    except (LoupeError, OSError):
        return engine.search(req), None, None           # the search reports the picture's error
    searched, mapped = Handoff(), Handoff()

    def own_map():
        maps = canvas_tokens(enc, [work])
        own = maps[0] if maps else None
        return own, saliency_map(work, own, config.w_feature, config.w_colour)

    def own_explanation():
        base, (own, _) = searched.get(), (mapped.get() or (None, None))
        if base is None or own is None:
            return None
        return explain_query(enc, work, own, explaining_pictures(engine, base.hits, req.image_id, config, name),
                             config)

    shape = work_shape(work.size)
    jobs = segment_jobs(work, shape, config) if config.segments > 0 else []
    calls = [searched.set(lambda: engine.search(req)), mapped.set(own_map)] + jobs
    calls += [own_explanation] if config.residual is not None else []
    base, (own, sal), *rest = side_by_side(enc, calls)
    masks = masks_from_segmentations(rest[:len(jobs)], shape, config) if jobs else None
    found = rest[len(jobs)] if config.residual is not None else None
    return base, own, QueryParts(work, own, sal, masks, found)


def stored_view(engine, encoder: str, image_id: str | None):
    """The feature map the region index stored for an indexed picture (``views.py``), or None."""
    if image_id is None:
        return None
    stored = getattr(getattr(engine, "region_sets", {}).get(encoder), "views", None)
    return stored.get(image_id) if stored is not None else None


def explaining_pictures(engine, hits: list[Hit], query_id: str | None, config: ProposalConfig,
                        encoder: str | None = None) -> list:
    """The pictures of the whole-picture search's top ``config.residual.hits`` hits (not the query itself)
    that may explain the query's background (``retrieval.regions.residual``): their feature maps stored by
    the region index (``views.py``) where it has them, else the pictures (encoded by the caller); a picture
    that cannot be read is left out."""
    if config.residual is None:
        return []
    region_set = getattr(engine, "region_sets", {}).get(encoder) if encoder else None
    stored = getattr(region_set, "views", None)
    out = []
    for hit in hits:
        if len(out) >= config.residual.hits:
            break
        if hit.id == query_id:
            continue
        view = stored.get(hit.id) if stored is not None else None
        if view is not None:
            out.append(view)
            continue
        try:
            out.append(engine.load_image(hit.id))
        except (LoupeError, OSError):
            continue
    return out


def jitter_box(box, grow: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` grown (``grow`` > 0) or shrunk on each side by ``grow`` × its width / height, clipped to ``size``."""
    x0, y0, x1, y1 = box
    dx, dy = grow * (x1 - x0), grow * (y1 - y0)
    nx0, ny0 = max(0, int(round(x0 - dx))), max(0, int(round(y0 - dy)))
    return (nx0, ny0, max(nx0 + 1, min(size[0], int(round(x1 + dx)))), max(ny0 + 1, min(size[1], int(round(y1 + dy)))))


def embed_regions(enc, image, boxes, jitter=CROP_JITTER) -> np.ndarray:
    """One unit vector per box: the mean of the embeddings of its crops at each ``jitter`` (one batch). The
    default is one crop: averaging the box and the box grown / shrunk by 10 % did not change the nearest
    region's R@1 on the benchmark's development set (docs/regions.md)."""
    crops = [crop_to_box(image, jitter_box(b, j, image.size)) for b in boxes for j in jitter]
    # passes side by side where the CPU has room (``encoders.passes``), one crop each: 3 crops on a 2-core box
    # with one torch thread took 80.6 ms in one batch, 69.0 ms as [2] | [1], 51.2 ms one by one on 2 threads
    chunks = [[c] for c in crops] if width(enc) > 1 else [crops]
    parts = side_by_side(enc, [lambda c=c: np.asarray(enc.encode_images(c), np.float32) for c in chunks])
    v = np.concatenate(parts).reshape(len(boxes), len(jitter), -1).mean(axis=1)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def _rescale(result: RegionSearch, have: tuple[int, int], want: tuple[int, int]) -> RegionSearch:
    fx, fy = want[0] / have[0], want[1] / have[1]
    for rr in result.regions:
        x0, y0, x1, y1 = rr.region.box
        box = (int(x0 * fx), int(y0 * fy), min(want[0], int(np.ceil(x1 * fx))), min(want[1], int(np.ceil(y1 * fy))))
        rr.region = Region(box, rr.region.score, rr.region.kind)
    result.size = tuple(want)
    return result


def fuse_region_hits(engine, encoder: str, query: np.ndarray, global_hits: list[Hit],
                     regions: list[RegionResult], k: int, rule: FuseRule = FUSE_RULE) -> list[Hit]:
    """The fused list (``retrieval.regions.fusion``): every candidate of every list, ranked by ``rule`` with
    the whole picture's exact cosine ``g`` and each region's scores, top ``k``."""
    best: dict[str, Hit] = {}
    for h in global_hits:
        best.setdefault(h.id, h)
    for rr in regions:
        for h in rr.hits:
            best.setdefault(h.id, h)
    if not best:
        return []
    cands = list(best.values())
    g = engine.vectors(encoder, cands) @ np.asarray(query, np.float32)
    fused = fuse({h.id: float(s) for h, s in zip(cands, g)}, [(h.id, h.score) for h in global_hits],
                 [(rr.region.kind, [(h.id, h.score) for h in rr.hits]) for rr in regions], rule)
    return [_with_score(best[c], s) for c, s in fused[:k]]


def _with_score(hit: Hit, score: float) -> Hit:
    import dataclasses

    return dataclasses.replace(hit, score=float(score))


# -- the region index ------------------------------------------------------------------------------
def merge_region_hits(engine, region_set, vector: np.ndarray, hits: list[Hit], k: int,
                      masks: list[np.ndarray] | None) -> list[Hit]:
    """``hits`` merged with the region index's best regions of ``vector``: each image keeps its better score;
    an image found by a region (better than by its whole picture) becomes a ``RegionHit`` with the box."""
    def allowed(image_id: str) -> bool:
        if masks is None:
            return True
        shard, row = engine.locate(image_id)
        return bool(masks[shard][row])

    merged: dict[str, Hit] = {h.id: h for h in hits}
    for image_id, score, box in region_set.search(vector, k, allowed):
        have = merged.get(image_id)
        if have is None or score > have.score:
            shard, row = engine.locate(image_id)
            merged[image_id] = RegionHit(image_id, score, shard, row, box=box)
    return sorted(merged.values(), key=lambda h: -h.score)[:k]


def hit_box(hit: Hit) -> list[int] | None:
    """The box of a hit found through a region of its picture (None for a whole-picture hit)."""
    box = getattr(hit, "box", None)
    return [int(v) for v in box] if box is not None else None


def with_box(describe):
    """``describe`` (one hit → its JSON) that adds ``"box"`` to a hit found through a region of its picture."""
    def out(hit: Hit) -> dict[str, Any]:
        body = describe(hit)
        box = hit_box(hit)
        if box is not None:
            body["box"] = box
        return body
    return out


def response_regions_json(response, describe) -> dict[str, Any]:
    """The region parts of a search's JSON: ``"box"`` (the query box searched) and ``"regions"``
    (``[{"box", "score", "kind", "results": [...]}]``, boxes in pixels of the query picture), when present."""
    out: dict[str, Any] = {}
    if getattr(response, "box", None) is not None:
        out["box"] = [int(v) for v in response.box]
    rs = getattr(response, "regions", None)
    if rs is not None:
        out["regions"] = [{**rr.region.to_json(), "results": [describe(h) for h in rr.hits]} for rr in rs.regions]
        if rs.size is not None:
            out["query_size"] = [int(rs.size[0]), int(rs.size[1])]
    return out
