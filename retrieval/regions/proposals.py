"""Object-region proposals for one picture, from the encoder's feature map and the picture's content.

1. **Saliency** (``saliency.py``): feature-map saliency (a cell whose token differs from the picture's mean
   token, on the picture padded so the grid covers every pixel) and colour distinctness, summed.
2. **Residual** (``residual.py``, only when the caller passes ``explain_by``: the pictures of the
   whole-picture search's top hits): when they explain most of the query, the query area they do not
   explain is the ``"residual"`` region, ranked first: the selective-search segment that the residual map
   singles out (without segments: the connected cells the hits do not explain).
3. **Segments (selective search).** ``grouping.selective_search`` on the picture resized to the saliency
   map: every region of the hierarchical grouping of Felzenszwalb superpixels, ranked without the encoder
   by the mean saliency of its own pixels minus the rest's, times the square root of its area fraction
   (``rank_segments``); the best ``segments`` come next.
4. **Connected salient components.** The saliency map is thresholded (Otsu's threshold and ``levels``,
   ``scipy.ndimage``: opened, labelled); each component between ``min_area`` and ``max_area`` of the
   picture gives its bounding box, grown by ``margin``; ranked by contrast.
5. **Multi-scale windows.** Windows of ``window_scales`` of the shorter side on a half-overlapping
   lattice, ranked by their contrast, fill up to ``max_regions`` (at least ``min_windows``; a box
   overlapping a chosen region by more than ``max_iou`` is skipped).

``propose_regions(image, encoder)`` returns ``Region``s in pixels of ``image``; the pure array steps
(``salient_components``, ``window_boxes``, ``otsu_threshold``, ``rank_segments``) take arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from retrieval.regions.residual import Explanation, ResidualConfig, explain
from retrieval.regions.saliency import WORK_SIDE, CanvasTokens, canvas_tokens, saliency_map


@dataclass(frozen=True)
class ProposalConfig:
    max_regions: int = 4
    min_area: float = 0.02           # a component's box, as a fraction of the picture
    max_area: float = 0.8
    margin: float = 0.15             # a component's box grows by this fraction of its sides
    levels: tuple[float, ...] = (0.5, 0.7)    # saliency levels thresholded besides Otsu's
    window_scales: tuple[float, ...] = (0.5, 0.35)
    max_iou: float = 0.5
    min_windows: int = 1             # regions kept for windows however many segments/components there are
    w_feature: float = 0.7           # weights of the two saliency maps
    w_colour: float = 0.3
    segments: int = 3                # regions kept for selective-search segments (``grouping.py``)
    segment_scales: tuple[float, ...] = (100.0,)
    segment_max_area: float = 0.6
    segment_margin: float = 0.05     # a segment's box grows by this fraction of its sides
    residual: ResidualConfig | None = ResidualConfig()   # the residual region (with ``explain_by``); None: off
    max_with_residual: int = 2       # at most this many regions when a residual region is found


DEFAULT_PROPOSALS = ProposalConfig()
EXPLAIN_BESIDE = True     # the RANSAC explanation in a thread beside the segmentations (same result)
# `loupe index --regions`: a few per picture: the residual region against the picture's 2 nearest indexed
# pictures (when they explain it), components and windows (saliency-ranked segments: not better on the tuning split)
INDEX_PROPOSALS = ProposalConfig(max_regions=4, segments=0, min_windows=2, max_with_residual=4)


@dataclass(frozen=True)
class Region:
    """A proposed region: ``box`` (x0, y0, x1, y1) in pixels, end exclusive; ``score`` its saliency;
    ``kind``: ``"residual"`` (what the best whole-picture matches do not explain), ``"segment"`` (a
    selective-search region), ``"salient"`` (a connected salient component) or ``"window"``."""

    box: tuple[int, int, int, int]
    score: float
    kind: str

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": round(float(self.score), 4), "kind": self.kind}


# -- pure array steps ---------------------------------------------------------------------------
def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``values`` (the level that maximises the between-class variance)."""
    v = np.asarray(values, np.float64).ravel()
    hist, edges = np.histogram(v, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


def salient_components(sal: np.ndarray, config: ProposalConfig = DEFAULT_PROPOSALS
                       ) -> list[tuple[tuple[float, float, float, float], float]]:
    """Connected components of the saliency map thresholded at several levels (Otsu's and ``config.levels``,
    a nested set: a big salient area and the peaks inside it) → ``[((x0, y0, x1, y1) in map cells, score)]``,
    best first (score: mean saliency × the square root of the box's area fraction), boxes grown by
    ``config.margin`` and clipped to the map."""
    out = []
    for level in sorted({max(otsu_threshold(sal), 0.2), *config.levels}):
        labels, _ = ndimage.label(ndimage.binary_opening(sal > level, iterations=1))
        out += [(box, float(sal[labels == i].mean()) * float(np.sqrt(area)))
                for i, box, area in _component_boxes(labels, config)]
    return sorted(out, key=lambda b: -b[1])


def _component_boxes(labels: np.ndarray, config: ProposalConfig):
    """(label, box grown by ``config.margin`` and clipped to the map, area fraction) of each labelled
    component whose area fraction is within ``[config.min_area, config.max_area]``."""
    h, w = labels.shape
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        my, mx = config.margin * (y1 - y0), config.margin * (x1 - x0)
        box = (max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w), x1 + mx), min(float(h), y1 + my))
        area = (box[2] - box[0]) * (box[3] - box[1]) / float(h * w)
        if config.min_area <= area <= config.max_area:
            yield i, box, area


def window_boxes(shape: tuple[int, int], scales: Sequence[float]) -> np.ndarray:
    """Square windows of ``scales`` × the shorter side on a half-overlapping lattice: float [N, 4] rows of
    (x0, y0, x1, y1) in map cells (the last position in each direction reaches the far edges)."""
    h, w = shape
    out = []
    for s in scales:
        side = max(1.0, float(s) * min(h, w))
        step = side / 2
        xs = sorted(set(np.arange(0, w - side + 1e-6, step).tolist()) | {w - side})
        ys = sorted(set(np.arange(0, h - side + 1e-6, step).tolist()) | {h - side})
        out += [(x, y, x + side, y + side) for y in ys for x in xs]
    return np.array(out, np.float64).reshape(-1, 4)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_contrast(integral: np.ndarray, box: Sequence[float]) -> float:
    """Mean saliency inside ``box`` (map cells) minus the mean outside it, from the map's integral image."""
    h, w = integral.shape[0] - 1, integral.shape[1] - 1
    r0, r1 = int(round(box[1])), max(int(round(box[1])) + 1, int(round(box[3])))
    c0, c1 = int(round(box[0])), max(int(round(box[0])) + 1, int(round(box[2])))
    r1, c1 = min(r1, h), min(c1, w)
    inside = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    n_in = max(1, (r1 - r0) * (c1 - c0))
    n_out = h * w - n_in
    outside = (integral[h, w] - inside) / n_out if n_out > 0 else 0.0
    return float(inside / n_in - outside)


def segment_masks(work: Image.Image, shape: tuple[int, int], config: ProposalConfig = DEFAULT_PROPOSALS):
    """Selective-search regions (``grouping.selective_search``, a ``grouping.Regions``) of ``work`` resized to
    ``shape = (h, w)`` whose box covers ``min_area`` to ``segment_max_area`` of it and that are not the whole
    picture; boxes in map cells."""
    from retrieval.regions.grouping import selective_search

    found = selective_search(_segment_input(work, shape), config.segment_scales, workers=_cpu_threads())
    return _object_sized(found, shape, config)


def segment_jobs(work: Image.Image, shape: tuple[int, int], config: ProposalConfig = DEFAULT_PROPOSALS) -> list:
    """``segment_masks``' segmentations as independent calls (``grouping.segmentation_jobs``), for a caller
    that runs them beside other work; ``masks_from_segmentations`` of their results gives the same regions."""
    from retrieval.regions.grouping import segmentation_jobs

    return segmentation_jobs(_segment_input(work, shape), config.segment_scales)


def masks_from_segmentations(done, shape: tuple[int, int], config: ProposalConfig = DEFAULT_PROPOSALS):
    """The regions of ``segment_masks`` from the results of ``segment_jobs`` (in order)."""
    from retrieval.regions.grouping import collect_regions

    return _object_sized(collect_regions(done), shape, config)


def _segment_input(work: Image.Image, shape: tuple[int, int]) -> np.ndarray:
    h, w = shape
    return np.asarray(work.convert("RGB").resize((w, h), Image.BILINEAR))


def _object_sized(found, shape: tuple[int, int], config: ProposalConfig):
    """The regions of ``found`` whose box covers ``min_area`` to ``segment_max_area`` of the map and that are
    not the whole picture."""
    h, w = shape
    if not len(found):
        return found
    area = (found.boxes[:, 2] - found.boxes[:, 0]) * (found.boxes[:, 3] - found.boxes[:, 1]) / float(h * w)
    keep = (area >= config.min_area) & (area <= config.segment_max_area) & (found.pixel_sums() < h * w)
    return found.subset(np.flatnonzero(keep))


def _cpu_threads() -> int:
    """Threads for the segmentations: the CPU's cores (no encoder pass of the query runs meanwhile, so torch's
    ``LOUPE_THREADS`` leave them idle; 2-core box, one torch thread: 162.2 -> 157.5 ms a ``regions`` query)."""
    from retrieval.encoders.passes import cpu_cores

    return cpu_cores()


def rank_segments(segments, score_map: np.ndarray, margin: float, area_power: float = 0.5
                  ) -> list[tuple[tuple[float, float, float, float], float]]:
    """``segments`` (a ``grouping.Regions``, or ``[(box, mask)]``) ranked by ``score_map`` → ``[(box grown by
    margin, score)]``, best first. Score: the mean of the map over the region's own pixels minus over the
    rest of the picture, times the square root of its box's area fraction (an object's segments stand out,
    a background segment does not; a larger box that stands out beats a fragment)."""
    from retrieval.regions.grouping import Regions

    h, w = score_map.shape
    total = float(score_map.sum())
    if isinstance(segments, Regions):
        boxes = [segments.box(i) for i in range(len(segments))]
        counts, inside = segments.pixel_sums(), segments.pixel_sums(score_map)
    else:
        boxes = [box for box, _ in segments]
        counts = [float(mask.sum()) for _, mask in segments]
        inside = [float(score_map[mask].sum()) for _, mask in segments]
    out = []
    for box, n_in, s_in in zip(boxes, counts, inside):
        area = (box[2] - box[0]) * (box[3] - box[1]) / float(h * w)
        score = (s_in / n_in - (total - s_in) / (h * w - n_in)) * float(area ** area_power)
        mx, my = margin * (box[2] - box[0]), margin * (box[3] - box[1])
        out.append(((max(0.0, box[0] - mx), max(0.0, box[1] - my), min(float(w), box[2] + mx),
                     min(float(h), box[3] + my)), float(score)))
    return sorted(out, key=lambda b: -b[1])


def segment_candidates(sal: np.ndarray, work: Image.Image, config: ProposalConfig = DEFAULT_PROPOSALS
                       ) -> list[tuple[tuple[float, float, float, float], float]]:
    """Selective-search regions of ``work`` ranked by saliency (``rank_segments``), best first."""
    return rank_segments(segment_masks(work, sal.shape, config), sal, config.segment_margin)


def residual_candidates(residual: np.ndarray, segments, config: ProposalConfig = DEFAULT_PROPOSALS
                        ) -> list[tuple[tuple[float, float, float, float], float]]:
    """The residual region's candidates on the work map, best first: the ``segments`` ranked by the residual
    map (``rank_segments`` with ``area_power``); without segments, the connected areas the hits do not explain
    (the map above ``1 - explained_sim``; boxes grown by ``margin``, ranked by their summed residual; their
    boxes fit the object worse: median IoU 0.36 against 0.68 for the segments on the tuning split)."""
    rc = config.residual or ResidualConfig()
    if len(segments):
        return rank_segments(segments, residual, config.segment_margin, rc.area_power)
    labels, _ = ndimage.label(residual > 1.0 - rc.explained_sim)
    out = [(box, float(residual[labels == i].sum())) for i, box, _ in _component_boxes(labels, config)]
    return sorted(out, key=lambda b: -b[1])


def regions_from_saliency(sal: np.ndarray, size: tuple[int, int], config: ProposalConfig = DEFAULT_PROPOSALS,
                          segments: Sequence[tuple[tuple[float, ...], float]] = (),
                          residual: Sequence[tuple[tuple[float, ...], float]] = ()) -> list[Region]:
    """The best ``residual`` candidate (when given), up to ``config.segments`` selective-search ``segments``
    (``segment_candidates``, in their order), then salient components, then the most salient windows (each
    ranked by its contrast, ``box_contrast``), as ``Region``s in pixels of a picture of ``size``; a box
    overlapping a chosen one by IoU > ``max_iou`` is skipped."""
    h, w = sal.shape
    fx, fy = size[0] / w, size[1] / h
    integral = np.pad(sal.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    chosen: list[tuple[tuple[float, ...], float, str]] = []
    n_windows = min(config.min_windows, config.max_regions - 1)
    n_residual = min(1, len(residual))
    if n_residual:
        config = replace(config, max_regions=max(1, min(config.max_regions, config.max_with_residual)))
    stages = (("residual", list(residual), n_residual, False),
              ("segment", list(segments), min(n_residual + config.segments, config.max_regions - n_windows), False),
              ("salient", [b for b, _ in salient_components(sal, config)], config.max_regions - n_windows, True),
              ("window", [tuple(b) for b in window_boxes(sal.shape, config.window_scales)], config.max_regions, True))
    for kind, boxes, limit, rank in stages:
        if rank:
            scored = sorted(((box_contrast(integral, b), b) for b in boxes), key=lambda t: -t[0])
        else:
            scored = [(score, b) for b, score in boxes]
        for score, box in scored:
            if len(chosen) >= limit:
                break
            if all(box_iou(box, c[0]) <= config.max_iou for c in chosen):
                chosen.append((box, score, kind))
    out = []
    for box, score, kind in chosen:
        x0, y0 = int(np.floor(box[0] * fx)), int(np.floor(box[1] * fy))
        x1, y1 = int(np.ceil(box[2] * fx)), int(np.ceil(box[3] * fy))
        out.append(Region((max(0, x0), max(0, y0), min(size[0], max(x1, x0 + 1)), min(size[1], max(y1, y0 + 1))),
                          float(score), kind))
    return out


def work_picture(image: Image.Image) -> Image.Image:
    """``image`` at most ``4 * WORK_SIDE`` pixels on its longer side (the encoder sees a few hundred
    pixels; saliency needs no more)."""
    image = image.convert("RGB")
    size = work_size(image.size)
    return image if size == image.size else image.resize(size, Image.BILINEAR)


@dataclass
class QueryParts:
    """What ``propose_regions`` computes before it ranks, computed by a caller beside its own passes
    (``retrieval.regions.search``): the work picture, its feature map (None without one), its saliency map,
    its segments (``segment_masks``; None: none wanted) and the explanation of its background (None: none)."""

    work: Image.Image
    view: CanvasTokens | None
    saliency: np.ndarray
    masks: object | None
    explanation: Explanation | None


def propose_regions(image: Image.Image, encoder=None, config: ProposalConfig = DEFAULT_PROPOSALS,
                    explain_by: Sequence[Image.Image | CanvasTokens] = (), *, explanation: list | None = None,
                    view: CanvasTokens | None = None) -> list[Region]:
    """Object regions of ``image`` (see module docstring), in pixels of ``image``; ``encoder``: the index's
    encoder whose feature map gives the feature saliency (None: content saliency only); ``explain_by``: the
    pictures of the whole-picture search's top hits, or their stored maps (``views.py``), for the residual
    region (needs ``encoder``); ``view``: ``image``'s own map when it is known (``canvas_tokens`` of its
    work picture). When ``explanation`` is a list, the ``residual.Explanation`` (or None) is appended to it."""
    image = image.convert("RGB")
    work = work_picture(image)
    rc = config.residual
    explain_by = list(explain_by)[:rc.hits] if rc is not None else []
    views = None
    if encoder is not None and (config.w_feature > 0 or explain_by):
        views = _views(encoder, work, explain_by, view)
    pending = None
    if views and len(views) > 1 and config.segments > 0 and EXPLAIN_BESIDE and _cpu_threads() > 1:
        from retrieval.regions.grouping import _pool  # the explanation beside the segmentations

        pending = _pool().submit(explain, views[0], views[1:], rc)
    sal = saliency_map(work, views[0] if views else None, config.w_feature, config.w_colour)
    masks = segment_masks(work, sal.shape, config) if config.segments > 0 else None
    if pending is not None:
        found: Explanation | None = pending.result()
    else:
        found = explain(views[0], views[1:], rc) if views and len(views) > 1 else None
    if explanation is not None:
        explanation.append(found)
    return regions_from_parts(image, QueryParts(work, views[0] if views else None, sal, masks, found), config)


def explain_query(encoder, work: Image.Image, view: CanvasTokens | None, explain_by: Sequence,
                  config: ProposalConfig = DEFAULT_PROPOSALS) -> Explanation | None:
    """``propose_regions``' explanation of ``work`` (its map ``view``) by the pictures or maps ``explain_by``
    (the first ``config.residual.hits``; pictures are encoded in one batch); None without a map, a residual
    config or a picture to explain by."""
    rc = config.residual
    if rc is None or view is None or encoder is None:
        return None
    views = _views(encoder, work, list(explain_by)[:rc.hits], view)
    return explain(views[0], views[1:], rc) if views and len(views) > 1 else None


def regions_from_parts(image: Image.Image, parts: QueryParts, config: ProposalConfig = DEFAULT_PROPOSALS
                       ) -> list[Region]:
    """The regions of ``image`` from its ``QueryParts`` (``parts.work`` must be ``work_picture(image)``):
    its segments ranked by saliency, the residual region when the explanation leaves one, then
    ``regions_from_saliency``."""
    rc, sal, masks, found = config.residual, parts.saliency, parts.masks, parts.explanation
    segments = rank_segments(masks, sal, config.segment_margin) if masks is not None else []
    residual = []
    if found is not None and found.fraction >= rc.min_explained and found.unexplained(rc) >= rc.min_cells:
        if masks is None:                  # segmented only when a residual needs them (``INDEX_PROPOSALS``)
            masks = segment_masks(parts.work, sal.shape, config)
        residual = residual_candidates(parts.view.sample(found.residual_cells(), sal.shape), masks, config)
    return regions_from_saliency(sal, image.size, config, segments, residual)


def work_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size ``work_picture`` gives a picture of ``size``."""
    if max(size) <= 4 * WORK_SIDE:
        return tuple(size)
    scale = 4 * WORK_SIDE / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _views(encoder, work: Image.Image, explain_by: Sequence, view: CanvasTokens | None
           ) -> list[CanvasTokens] | None:
    """``[work's map] + the explaining pictures' maps``: the known ones as they are, the others encoded in
    one batch; None when the encoder has no feature map."""
    todo = ([] if view is not None else [work]) + [work_picture(p) for p in explain_by
                                                   if not isinstance(p, CanvasTokens)]
    encoded = canvas_tokens(encoder, todo) if todo else []
    if encoded is None:
        return None
    fresh = iter(encoded)
    out = [view if view is not None else next(fresh)]
    out += [p if isinstance(p, CanvasTokens) else next(fresh) for p in explain_by]
    return out
