"""Object-region proposals for one picture, from the encoder's feature map and the picture's content.

1. **Feature-map saliency.** The picture is padded to the square the encoder's centre crop keeps whole
   (``retrieval.rerank.regions.encoder_view``), so its feature grid covers every pixel; a cell is salient
   when its token differs from the picture's mean token (``1 - cos``): an object stands out from the
   surroundings it was pasted on or photographed against. The finer map is used when the encoder has
   one (effnet-lite0: 14x14 stage-4 cells, ``encode_images_and_fine``).
2. **Content saliency.** Colour distinctness (Achanta et al., frequency-tuned saliency): the distance of
   the blurred picture's colours from the picture's mean colour and from its border's median colour.
3. **Segments (selective search).** ``grouping.selective_search`` on the picture resized to the saliency
   map: every region of the hierarchical grouping of Felzenszwalb superpixels, ranked without the encoder
   by the mean saliency of its own pixels minus the rest's, times the square root of its area fraction
   (``segment_candidates``); the best ``segments`` come first.
4. **Connected salient components.** The sum of both maps (each scaled to [0, 1]) is thresholded
   (Otsu's threshold, ``scipy.ndimage``: opened, labelled); each component between ``min_area`` and
   ``max_area`` of the picture gives its bounding box, grown by ``margin``; ranked by contrast.
5. **Multi-scale windows.** Windows of ``window_scales`` of the shorter side on a half-overlapping
   lattice, ranked by their contrast, fill up to ``max_regions`` (at least ``min_windows``; a box
   overlapping a chosen region by more than ``max_iou`` is skipped).

``propose_regions(image, encoder)`` returns ``Region``s in pixels of ``image``; the pure array steps
(``salient_components``, ``window_boxes``, ``otsu_threshold``) take arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

WORK_SIDE = 128            # the saliency maps' longer side (pixels)


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


DEFAULT_PROPOSALS = ProposalConfig()
# `loupe index --regions`: a few per picture; components and windows only (segments not yet measured there)
INDEX_PROPOSALS = ProposalConfig(max_regions=4, segments=0, min_windows=2)


@dataclass(frozen=True)
class Region:
    """A proposed region: ``box`` (x0, y0, x1, y1) in pixels, end exclusive; ``score`` its saliency;
    ``kind``: ``"salient"`` (a connected salient component) or ``"window"``."""

    box: tuple[int, int, int, int]
    score: float
    kind: str

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": round(float(self.score), 4), "kind": self.kind}


# -- saliency maps ------------------------------------------------------------------------------
def feature_saliency(encoder, image: Image.Image, out_shape: tuple[int, int]) -> np.ndarray:
    """Per pixel of an ``out_shape = (h, w)`` map of ``image``: how far its feature-map token is from the
    picture's mean token (``1 - cos``), in [0, 2]; zeros when the encoder has no feature map."""
    from retrieval.errors import UnsupportedModalityError
    from retrieval.rerank.regions import encoder_view

    w, h = image.size
    side = max(w, h)
    vx0, _, vx1, _ = encoder_view(getattr(encoder, "spec", None), (1000, 1000))
    frac = (vx1 - vx0) / 1000.0
    canvas_side = int(round(side / max(frac, 1e-3)))
    mean = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
    canvas = Image.new("RGB", (canvas_side, canvas_side), mean)
    ox, oy = (canvas_side - w) // 2, (canvas_side - h) // 2
    canvas.paste(image, (ox, oy))
    try:
        if "fine" in getattr(encoder, "local_layers", ()) and hasattr(encoder, "encode_images_and_fine"):
            _, _, _, tokens, grid = encoder.encode_images_and_fine([canvas])
        else:
            _, tokens, grid = encoder.encode_images_and_local([canvas])
    except UnsupportedModalityError:
        return np.zeros(out_shape, np.float32)
    gh, gw = int(grid[0]), int(grid[1])
    t = np.asarray(tokens[0], np.float32).reshape(gh, gw, -1)
    # the grid covers the view square [c0, c0 + side) of the canvas; cells -> picture pixels
    c0 = (canvas_side - side) / 2.0
    ys = (np.arange(gh) + 0.5) * side / gh + c0 - oy
    xs = (np.arange(gw) + 0.5) * side / gw + c0 - ox
    inside = (ys[:, None] >= 0) & (ys[:, None] < h) & (xs[None, :] >= 0) & (xs[None, :] < w)
    if not inside.any():
        return np.zeros(out_shape, np.float32)
    cells = t[inside]
    centre = cells.mean(axis=0)
    centre /= max(float(np.linalg.norm(centre)), 1e-12)
    norms = np.maximum(np.linalg.norm(t, axis=2), 1e-12)
    sal = np.where(inside, 1.0 - (t @ centre) / norms, 0.0).astype(np.float32)
    # sample the cell map at the output pixels (bilinear over cell centres)
    oh, ow = out_shape
    py = (np.arange(oh) + 0.5) * h / oh
    px = (np.arange(ow) + 0.5) * w / ow
    gy = ((py + oy - c0) * gh / side - 0.5).clip(0, gh - 1)
    gx = ((px + ox - c0) * gw / side - 0.5).clip(0, gw - 1)
    return ndimage.map_coordinates(sal, np.meshgrid(gy, gx, indexing="ij"), order=1, mode="nearest")


def colour_saliency(image: Image.Image, out_shape: tuple[int, int]) -> np.ndarray:
    """Colour distinctness per pixel of an ``out_shape`` map: distance of the blurred colour from the mean
    colour and from the border's median colour (the larger), RGB scaled to [0, 1]."""
    small = np.asarray(image.convert("RGB").resize((out_shape[1], out_shape[0]), Image.BILINEAR), np.float32) / 255
    blurred = ndimage.gaussian_filter(small, sigma=(1.0, 1.0, 0))
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    d_mean = np.linalg.norm(blurred - small.reshape(-1, 3).mean(axis=0), axis=2)
    d_border = np.linalg.norm(blurred - np.median(border, axis=0), axis=2)
    return np.maximum(d_mean, d_border).astype(np.float32)


def _unit_range(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi - lo < 1e-6 else (a - lo) / (hi - lo)


def saliency_map(encoder, image: Image.Image, config: ProposalConfig = DEFAULT_PROPOSALS) -> np.ndarray:
    """The combined saliency of ``image`` in [0, 1] on a map whose longer side is ``WORK_SIDE``."""
    w, h = image.size
    scale = WORK_SIDE / max(w, h)
    shape = (max(4, int(round(h * scale))), max(4, int(round(w * scale))))
    sal = config.w_colour * _unit_range(colour_saliency(image, shape))
    if encoder is not None and config.w_feature > 0:
        sal = sal + config.w_feature * _unit_range(feature_saliency(encoder, image, shape))
    return _unit_range(sal)


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
    h, w = sal.shape
    out = []
    for level in sorted({max(otsu_threshold(sal), 0.2), *config.levels}):
        mask = ndimage.binary_opening(sal > level, iterations=1)
        labels, _ = ndimage.label(mask)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is None:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            my, mx = config.margin * (y1 - y0), config.margin * (x1 - x0)
            box = (max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w), x1 + mx), min(float(h), y1 + my))
            area = (box[2] - box[0]) * (box[3] - box[1]) / float(h * w)
            if not config.min_area <= area <= config.max_area:
                continue
            out.append((box, float(sal[labels == i].mean()) * float(np.sqrt(area))))
    return sorted(out, key=lambda b: -b[1])


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


def segment_candidates(sal: np.ndarray, work: Image.Image, config: ProposalConfig = DEFAULT_PROPOSALS
                       ) -> list[tuple[tuple[float, float, float, float], float]]:
    """Selective-search regions of ``work`` (``grouping.selective_search`` on the picture resized to the
    saliency map) → ``[(box in map cells, score)]``, best first. Score: the mean saliency of the region's
    own pixels minus that of the rest of the picture, times the square root of its box's area fraction (an
    object's segments are salient, a background segment is not; a larger salient box beats a fragment)."""
    from retrieval.regions.grouping import selective_search

    h, w = sal.shape
    rgb = np.asarray(work.convert("RGB").resize((w, h), Image.BILINEAR))
    total = float(sal.sum())
    out = []
    for box, mask in selective_search(rgb, config.segment_scales):
        area = (box[2] - box[0]) * (box[3] - box[1]) / float(h * w)
        n_in = int(mask.sum())
        if not config.min_area <= area <= config.segment_max_area or n_in == h * w:
            continue
        inside = float(sal[mask].sum())
        score = (inside / n_in - (total - inside) / (h * w - n_in)) * float(np.sqrt(area))
        mx, my = config.segment_margin * (box[2] - box[0]), config.segment_margin * (box[3] - box[1])
        out.append(((max(0.0, box[0] - mx), max(0.0, box[1] - my), min(float(w), box[2] + mx),
                     min(float(h), box[3] + my)), score))
    return sorted(out, key=lambda b: -b[1])


def regions_from_saliency(sal: np.ndarray, size: tuple[int, int], config: ProposalConfig = DEFAULT_PROPOSALS,
                          segments: Sequence[tuple[tuple[float, ...], float]] = ()) -> list[Region]:
    """Up to ``config.segments`` selective-search ``segments`` (``segment_candidates``, in their order), then
    salient components, then the most salient windows (each ranked by its contrast, ``box_contrast``), as
    ``Region``s in pixels of a picture of ``size``; a box overlapping a chosen one by IoU > ``max_iou`` is
    skipped."""
    h, w = sal.shape
    fx, fy = size[0] / w, size[1] / h
    integral = np.pad(sal.astype(np.float64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    chosen: list[tuple[tuple[float, ...], float, str]] = []
    n_windows = min(config.min_windows, config.max_regions - 1)
    stages = (("segment", list(segments), min(config.segments, config.max_regions - n_windows), False),
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


def propose_regions(image: Image.Image, encoder=None, config: ProposalConfig = DEFAULT_PROPOSALS) -> list[Region]:
    """Object regions of ``image`` (see module docstring), in pixels of ``image``; ``encoder``: the index's
    encoder whose feature map gives the feature saliency (None: content saliency only)."""
    image = image.convert("RGB")
    work = image
    if max(image.size) > 4 * WORK_SIDE:      # the encoder sees a few hundred pixels; saliency needs no more
        scale = 4 * WORK_SIDE / max(image.size)
        work = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.BILINEAR)
    sal = saliency_map(encoder, work, config)
    segments = segment_candidates(sal, work, config) if config.segments > 0 else []
    return regions_from_saliency(sal, image.size, config, segments)
