"""Why did a result match? Heatmaps over the result image (and over the query image).

Methods (``method=``):

* ``"tokens"`` — ViT encoders (CLIP, DINOv2): similarity decomposition over patch tokens. Each patch
  token ``t_i`` (CLIP: after ``ln_post`` and ``proj``, i.e. in the joint space) contributes
  ``<q, t_i> / ||g||`` to the cosine of the query vector ``q`` with the image's global vector ``g``.
  For CLIP the raw map is known to be noisy and often *inverted* (background lights up): following
  CLIP Surgery (Li et al., 2023) the component shared by all patches (their mean token, which carries
  the global "redundant" features) is removed first: ``<q, t_i - mean_j t_j>``. Negative
  contributions are clipped.
* ``"gradcam"`` — CNN encoders (``effnet-lite0``, ``conse-effnet-lite0``): Grad-CAM on the final
  feature map with the cosine similarity as the target. For ConSE the target is the cosine between
  the ConSE image vector and the query vector; the ConSE combination (top-T softmax probabilities,
  renormalised, times the class text embeddings) is differentiable in the probabilities, so the
  gradient flows through the softmax into the feature map (the top-T selection is piecewise constant).
* ``"cam"`` — CNN encoders, an exact linear decomposition (no gradients): the global vector is the
  mean of the feature-map cells, so for ``effnet-lite0`` cell ``i`` contributes
  ``<q, f_i> / (hw ||g||)`` to the cosine; for ConSE, the logits are linear in the cells too, and the
  map is ``Σ_k w_k max(<s_k, q>, 0) (W_k · f_i)`` over the top-T classes ``k`` (probability weight
  ``w_k``, class text embedding ``s_k``, classifier row ``W_k``): the class activation maps of the
  classes that make up the ConSE vector, weighted by how much each class agrees with the query.
  On planted composites, Grad-CAM through the ConSE softmax saturates (when the top classes already
  agree with the query, the gradient mostly pushes the *other* classes down and lights up the
  background), while this map localises the object.
* ``"gradinput"`` — CNN encoders: gradient × activation of the cosine target, summed over channels
  (positive part), at finer layers than the final 7×7 map: by default the input itself (224×224) and
  the 28×28 and 14×14 stages (``cnn_layers``); each layer's map is normalised and the maps averaged.
  The final map is too coarse for a 20 %-area question (one cell is 2 % of the image); the gradient at
  the input concentrates on the object's edges and texture, the pixels the similarity depends on.
  It was the default before ``integrated``.
* ``"integrated"`` — CNN encoders: Integrated Gradients (Sundararajan et al., 2017) of the cosine
  target along the straight path from a *baseline* image to the image: the baseline is the image
  filled with its own mean colour (``ig_baseline="mean"``) or a blurred copy (``"blur"``), i.e. the
  image with its content removed. Per input pixel, ``(x - x̄) · mean_s ∇f(x̄ + α_s (x - x̄))`` over
  ``ig_steps`` midpoints ``α_s`` (one batched forward + backward pass), summed over colour channels,
  positive part; with ``ig_layers`` naming EfficientNet stages too, each stage adds
  ``(a(x) - a(x̄)) · mean_s ∇_a f`` (its activations' difference times the path-averaged gradient) and
  the normalised maps are averaged. By completeness the pixel attributions sum to ``f(x) - f(x̄)``:
  they say which pixels, replaced by the baseline, would take the similarity down, which is the
  question an attribution overlay answers. The map shown is made readable at the scale of the
  encoder's receptive field (``grid.legible_map``): the *signed* per-pixel map is blurred with a
  Gaussian (``ig_smooth``, a fraction of the input side; opposite evidence cancels) and its positive part
  blended with the per-pixel positive part (``ig_blend`` of it, each scaled by its 99th percentile), so a
  person sees regions, not single-pixel speckle (``docs/attribution.md``, deletion figures in
  ``benchmarks/RESULTS.md``, "Issue 19").
* ``"integrated-raw"`` — the same integrated gradients per pixel, unsmoothed (the default before the
  smoothed map; what the completeness test checks). Plain gradient × input (``gradinput``) is the one-step,
  zero-baseline special case; the baseline and the path matter because the network is far from
  linear between an image and its blank (``benchmarks/results/attribution.md``). The default for
  ``effnet-lite0``: the largest deletion-test drop of the methods here (``benchmarks/bench_attribution.py``;
  steps and layers chosen on the even-numbered pairs). For ConSE text queries ``occlusion`` came out
  ahead on those pairs (1.28× vs 1.10× the random drop; ``integrated`` led on the other half) and is the
  default there.
* ``"eigencam"`` — Eigen-CAM (no gradients, query independent): the feature map projected on its
  first principal direction. Works for CNN feature maps and ViT patch tokens alike.
* ``"occlusion"`` — any encoder, perturbation-based (Zeiler & Fergus, 2014): a square window (default
  36 % of the side the encoder sees) slides over the encoder's input with a stride of half a window;
  each position is filled with the image's mean colour (``fill="mean"``, or ``"blur"``: a blurred copy),
  the occluded inputs are embedded in batches, and every pixel gets the mean drop of the cosine with
  the query over the windows that cover it (positive part). No gradients, works for ViTs and CNNs and
  for ConSE's non-linear embedding alike; it costs one forward pass per window (25 by default).
* ``"rise"`` — any encoder, perturbation-based like occlusion but with random masks (RISE, Petsiuk et al.,
  2018; ``retrieval.explain.rise``): ``rise_masks`` smooth random masks (cells of a ``rise_grid`` lattice, each
  deleted with probability ``rise_p``, upsampled with a random shift) replace parts of the input with its mean
  colour; a pixel scores the mean similarity drop of the masks that hide it minus that of the masks that keep
  it (positive part). Smooth by construction and measured on the encoder itself; on the image→image tuning
  pairs it scored below ``integrated`` on the deletion test (``benchmarks/RESULTS.md``, "Issue 19: deletion-faithful
  maps and the oracle"), so it is not a default.
* ``"colour"`` — the ``colour-names`` encoder: each pixel's exact first-order share of the colour match
  (:func:`retrieval.colour.naming.pixel_contributions`): its object weight times its colour-term memberships,
  each term valued at the match's derivative. A "red" query lights up the red pixels.
* ``"matches"`` — for (re-ranked) image queries: the locally matched regions themselves; the mutual
  nearest-neighbour matches that RANSAC keeps as inliers, each cell weighted by its similarity, on
  both images.

Maps live on the encoder's grid, then are mapped back to the original image: the grid covers the
preprocessing's centre crop (``crop_box``), is upsampled bilinearly there and is zero outside. Every
heatmap is float32 ``[H, W]`` in ``[0, 1]`` at the image's original size; deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from retrieval.errors import InvalidQueryError, UnsupportedModalityError

from .cnn import cnn_map
from .config import METHODS, AttributionConfig
from .grid import crop_box, eigen_cam, to_image_map, token_contributions
from .matching import match_maps
from .occlusion import occlusion_map
from .rise import rise_map

__all__ = ["Explanation", "attribute", "attribute_grid", "explain", "default_method", "describe", "TEXT_NOTE"]

_VIT = ("clip", "dinov2")
_CNN = ("effnet", "conse")

# Shown with text→image maps of the offline ConSE encoder (page, PNG legend, JSON, CLI): its maps do not
# reach 2× random on the deletion test (benchmarks/RESULTS.md, "Issue 19"), so they are not silently weak.
TEXT_NOTE = ("approximate: text attributions are weak for this offline encoder (deletion test about 1.3x "
             "random, goal 2x); treat the map as a hint")

_LABELS = {
    "tokens": "patch-token share of the similarity",
    "gradcam": "Grad-CAM (7x7 cells)",
    "cam": "class-activation decomposition (7x7 cells)",
    "gradinput": "gradient x input",
    "integrated": "integrated gradients, smoothed",
    "integrated-raw": "integrated gradients, per pixel",
    "eigencam": "Eigen-CAM (query independent)",
    "occlusion": "occlusion: similarity drop when hidden",
    "rise": "RISE: similarity drop when hidden (random masks)",
    "matches": "locally matched regions",
    "colour": "share of the colour match",
}


def describe(method: str) -> str:
    """A short human label of a method (the legend's)."""
    return _LABELS.get(method, method)


@dataclass
class Explanation:
    """Heatmaps for one (query, result) pair: result image, and query image for image queries.

    ``result_box`` / ``query_box``: the region of each image the encoder saw (``crop_box``); the
    overlays mark the rest as not seen. ``note``: a caveat to show with the map (e.g. ``TEXT_NOTE``)."""

    result: np.ndarray                    # float32 [H, W] in [0, 1] (result image's size)
    method: str
    encoder: str
    query: np.ndarray | None = None       # float32 [Hq, Wq] for image queries
    extra: dict[str, Any] = field(default_factory=dict)
    result_image: Image.Image | None = None
    query_image: Image.Image | None = None
    result_box: tuple | None = None
    query_box: tuple | None = None
    note: str | None = None

    @property
    def label(self) -> str:
        return describe(self.method)


def _vit_tokens(encoder, image: Image.Image) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(global vector before normalisation [d], patch tokens [p, c] before normalisation, grid)."""
    family = encoder.spec.family
    with encoder.lock, torch.inference_mode():
        x = encoder.to_batch([image])
        if family == "clip":
            pooled, tokens = encoder._tokens(x)
            grid = encoder.grid
        else:
            pooled, tokens, grid = encoder._forward(x)
    return (pooled[0].float().cpu().numpy(), tokens[0].float().cpu().numpy(), (int(grid[0]), int(grid[1])))


def default_method(encoder, image_query: bool = False) -> str:
    """The method ``"auto"`` means for ``encoder``; ``image_query``: the query is an image (no text), so the
    similarity is image→image and goes through the encoder's image path only."""
    fam = encoder.spec.family
    if fam in _VIT:
        return "tokens"
    if fam == "effnet":
        return "integrated"     # best deletion score on the tuning pairs (benchmarks/results/attribution.md)
    if fam == "conse":
        # image→image: both vectors come from the EfficientNet image path, the one effnet-lite0 explains with
        # integrated gradients (differentiable through the ConSE combination: cnn.conse_vector_torch);
        # text→image: occlusion, best on the text tuning pairs, narrowly (benchmarks/results/attribution.md)
        return "integrated" if image_query else "occlusion"
    if fam == "colour":
        return "colour"         # exact per-pixel shares of the colour match (retrieval.colour.naming)
    raise UnsupportedModalityError(f"encoder {encoder.name!r} has no spatial map to attribute; "
                                   "use a CLIP, DINOv2, effnet-lite0 or conse-effnet-lite0 index")


def attribute_grid(encoder, image: Image.Image, query: np.ndarray | None, method: str = "auto",
                   config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """A heatmap on the encoder's grid [h, w] (not normalised) for ``image`` against ``query``."""
    method = default_method(encoder) if method == "auto" else method
    fam = encoder.spec.family
    if method not in METHODS or method in ("auto", "matches"):
        raise InvalidQueryError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    default_method(encoder)   # raises for encoders without a spatial map
    if method != "eigencam" and query is None:
        raise InvalidQueryError(f"attribution method {method!r} needs a query vector")
    if method == "occlusion":
        return occlusion_map(encoder, image, query, config)
    if method == "rise":
        return np.maximum(rise_map(encoder, image, query, config), 0.0)
    if (method == "colour") != (fam == "colour"):
        raise InvalidQueryError("attribution method 'colour' is for the colour-names encoder, which takes "
                                "'colour' or 'occlusion'")
    if fam == "colour":
        from retrieval.colour.naming import pixel_contributions

        return pixel_contributions(encoder.to_batch([image]), query)
    if fam in _CNN:
        if method == "tokens":
            raise InvalidQueryError(f"{encoder.name} is a CNN: use method 'integrated', 'integrated-raw', "
                                    "'rise', 'gradinput', 'gradcam', 'cam', 'occlusion' or 'eigencam'")
        return cnn_map(encoder, image, query, method, config)
    if method in ("gradcam", "cam", "gradinput", "integrated", "integrated-raw"):
        raise InvalidQueryError(f"{encoder.name} is a ViT: use method 'tokens', 'occlusion', 'rise' or 'eigencam'")
    pooled, tokens, grid = _vit_tokens(encoder, image)
    if method == "eigencam":
        return eigen_cam(tokens).reshape(grid)
    surgery = (fam == "clip") if config.surgery is None else config.surgery
    return token_contributions(tokens, query, float(np.linalg.norm(pooled)), surgery=surgery,
                               relu=config.relu).reshape(grid)


def attribute(encoder, image: Image.Image, query: np.ndarray | None, method: str = "auto",
              config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """The heatmap of ``image`` against the query vector: float32 [H, W] in [0, 1], original size."""
    grid_map = attribute_grid(encoder, image, query, method, config)
    return to_image_map(grid_map, image.size, crop_box(encoder, image.size))


# -- engine-level ------------------------------------------------------------------------------
def explain(engine, ctx, result_id: str, *, method: str = "auto", rerank: bool = False,
            result_image: Image.Image | None = None, config: AttributionConfig = AttributionConfig(),
            query_side: bool = True, pair: bool = False) -> Explanation:
    """Heatmaps for the query ``ctx`` (a ``QueryContext``) and the indexed image ``result_id``.

    ``query_side=False`` skips the query image's map (one attribution pass instead of two).
    ``pair=True`` (image queries): the query image's map too, and the locally matched regions
    (``extra["lines"]``, when the encoder has local features) for the side-by-side view.

    ``method="auto"``: the matched local regions for re-ranked image queries (``rerank=True``), else
    token decomposition (ViT), smoothed integrated gradients from a mean-colour baseline (``integrated``:
    effnet-lite0, and ConSE for image queries: its image path) or occlusion (ConSE text queries, which come with
    ``note=TEXT_NOTE``).
    """
    if method not in METHODS:
        raise InvalidQueryError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    enc = engine.encoder(ctx.encoder)
    engine.hit_for_id(enc.name, result_id)          # unknown id → UnknownIdError (404) before any work
    image = result_image if result_image is not None else engine.load_image(result_id)
    query_image = getattr(ctx, "image", None)
    if query_image is None and getattr(ctx, "image_id", None):
        query_image = engine.load_image(ctx.image_id)
    rbox = crop_box(enc, image.size)
    qbox = crop_box(enc, query_image.size) if query_image is not None else None
    note = TEXT_NOTE if (enc.spec.family == "conse" and query_image is None) else None
    if method == "auto":
        image_only = (query_image is not None and getattr(ctx, "text", None) is None
                      and not getattr(ctx, "instruction", None))
        method = ("matches" if (rerank and query_image is not None and enc.has_local_features)
                  else default_method(enc, image_query=image_only))
    if method == "matches":
        if query_image is None:
            raise InvalidQueryError("attribution method 'matches' needs an image query")
        qmap, rmap, info = match_maps(enc, query_image, image)
        return Explanation(to_image_map(rmap, image.size, rbox), method, enc.name,
                           to_image_map(qmap, query_image.size, qbox), info, image, query_image, rbox, qbox, note)
    result_map = attribute(enc, image, ctx.vector, method, config)
    query_map, extra = None, {}
    if query_image is not None and (query_side or pair):
        hit = engine.hit_for_id(enc.name, result_id)
        result_vec = engine.vectors(enc.name, [hit])[0]
        query_map = attribute(enc, query_image, result_vec, method, config)
    if pair and query_image is not None and enc.has_local_features:
        extra = match_maps(enc, query_image, image)[2]
    return Explanation(result_map, method, enc.name, query_map, extra, image, query_image, rbox, qbox, note)
