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
  question an attribution overlay answers. Plain gradient × input (``gradinput``) is the one-step,
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
from retrieval.numeric import l2_normalize_torch

__all__ = ["Explanation", "AttributionConfig", "METHODS", "attribute", "attribute_grid", "crop_box", "to_image_map",
           "eigen_cam", "token_contributions", "match_maps", "explain", "default_method", "occlusion_map",
           "occlusion_positions"]

METHODS = ("auto", "tokens", "gradcam", "cam", "gradinput", "integrated", "eigencam", "occlusion", "matches",
           "colour")
FILLS = ("mean", "blur")
_VIT = ("clip", "dinov2")
_CNN = ("effnet", "conse")


@dataclass(frozen=True)
class AttributionConfig:
    surgery: bool | None = None    # remove the patches' shared component (None: CLIP yes, DINOv2 no)
    relu: bool = True
    occlusion_window: float = 0.36  # occlusion: window side as a fraction of the encoder's input side
    occlusion_stride: float = 0.5   # occlusion: stride as a fraction of the window
    occlusion_fill: str = "mean"    # occlusion: "mean" (the image's mean colour) or "blur"
    batch_size: int = 16            # occlusion: occluded inputs per forward pass
    cnn_layers: tuple = ("input", 2, 4)   # gradinput: "input" and/or timm EfficientNet stage indices (0..6)
    ig_steps: int = 8               # integrated: path points (midpoint rule), embedded as one batch
    ig_baseline: str = "mean"       # integrated: "mean" (the image's mean colour) or "blur" (a blurred copy)
    ig_layers: tuple = ("input",)   # integrated: "input" and/or EfficientNet stage indices (0..6)


@dataclass
class Explanation:
    """Heatmaps for one (query, result) pair: result image, and query image for image queries."""

    result: np.ndarray                    # float32 [H, W] in [0, 1] (result image's size)
    method: str
    encoder: str
    query: np.ndarray | None = None       # float32 [Hq, Wq] for image queries
    extra: dict[str, Any] = field(default_factory=dict)
    result_image: Image.Image | None = None
    query_image: Image.Image | None = None


# -- geometry ----------------------------------------------------------------------------------
def crop_box(encoder, size: tuple[int, int]) -> tuple[float, float, float, float]:
    """The (left, top, right, bottom) region of an image of ``size`` (W, H) that the encoder sees.

    Every adapter resizes the shorter side and centre-crops a square: CLIP (open_clip) at 1.0 of the
    shorter side, EfficientNet at ``crop_pct`` (0.875), DINOv2 at ``image_size / resize`` (224/256).
    """
    w, h = size
    spec = encoder.spec
    if spec.family == "colour":      # colour-names sees the whole image, squashed to a square
        return 0.0, 0.0, float(w), float(h)
    frac = spec.get("crop_pct")
    if frac is None:
        frac = spec.image_size / float(spec.get("resize")) if spec.get("resize") else 1.0
    side = min(w, h) * float(frac)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    return left, top, left + side, top + side


def to_image_map(grid_map: np.ndarray, size: tuple[int, int],
                 box: tuple[float, float, float, float] | None = None) -> np.ndarray:
    """Bilinearly upsample a grid map into ``box`` of an image of ``size`` (W, H); zero outside; max 1."""
    w, h = int(size[0]), int(size[1])
    g = np.asarray(grid_map, np.float32)
    g = np.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)
    box = box or (0.0, 0.0, float(w), float(h))
    left, top, right, bottom = box
    x0, y0 = int(round(left)), int(round(top))
    x1, y1 = max(x0 + 1, int(round(right))), max(y0 + 1, int(round(bottom)))
    up = np.asarray(Image.fromarray(g, mode="F").resize((x1 - x0, y1 - y0), Image.BILINEAR), np.float32)
    out = np.zeros((h, w), np.float32)
    xs, ys = max(0, x0), max(0, y0)
    xe, ye = min(w, x1), min(h, y1)
    out[ys:ye, xs:xe] = up[ys - y0:ye - y0, xs - x0:xe - x0]
    out = np.maximum(out, 0.0)
    peak = float(out.max())
    return out / peak if peak > 0 else out


# -- grid-level maps ---------------------------------------------------------------------------
def token_contributions(tokens: np.ndarray, query: np.ndarray, global_norm: float = 1.0, *,
                        surgery: bool = False, relu: bool = True) -> np.ndarray:
    """Per-patch contribution ``<q, t_i (- mean_j t_j)> / ||g||`` for tokens [p, c] → [p]."""
    t = np.asarray(tokens, np.float64)
    if surgery:
        t = t - t.mean(axis=0, keepdims=True)
    s = t @ np.asarray(query, np.float64).reshape(-1) / max(float(global_norm), 1e-12)
    return np.maximum(s, 0.0) if relu else s


def eigen_cam(fmap: np.ndarray) -> np.ndarray:
    """Eigen-CAM: activations [p, c] projected on their first principal direction (sign: positive mass)."""
    a = np.asarray(fmap, np.float64)
    _, _, vt = np.linalg.svd(a, full_matrices=False)
    cam = a @ vt[0]
    if cam.sum() < 0:
        cam = -cam
    return np.maximum(cam, 0.0)


def _grad_cam(fmap: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    grads, = torch.autograd.grad(target, fmap)
    weights = grads.mean(dim=(2, 3), keepdim=True)            # [1, c, 1, 1]
    cam = torch.relu((weights * fmap).sum(dim=1))[0]          # [h, w]
    return cam.detach().double().cpu().numpy()


def conse_vector_torch(encoder, model, pooled: torch.Tensor) -> torch.Tensor:
    """ConSE image vectors [n, d] as a differentiable function of the pooled features [n, c]
    (equals ``encoder.encode_images``; the top-T selection is piecewise constant)."""
    probs = model.get_classifier()(pooled).float().softmax(dim=-1)
    t = max(1, min(int(encoder.top_t), probs.shape[1]))
    top = torch.topk(probs.detach(), t, dim=1).indices                 # [n, t]
    w = torch.gather(probs, 1, top)
    w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
    emb = torch.as_tensor(encoder.class_embeddings, device=pooled.device)[top]   # [n, t, d]
    return l2_normalize_torch(torch.einsum("nt,ntd->nd", w, emb))


def _combine(maps: list[np.ndarray]) -> np.ndarray:
    """Average of maps on different grids, each normalised to max 1, on the finest grid (bilinear)."""
    side = max(m.shape[0] for m in maps)
    total = np.zeros((side, side))
    for m in maps:
        m = np.asarray(Image.fromarray(m.astype(np.float32), mode="F").resize((side, side), Image.BILINEAR),
                       np.float64) if m.shape[0] != side else m
        peak = float(m.max())
        total += m / peak if peak > 0 else m
    return total / len(maps)


def _cnn_maps(encoder, image: Image.Image, query: np.ndarray | None, method: str, layers=()) -> np.ndarray:
    """``layers``: the stages of ``gradinput``, or the whole ``AttributionConfig`` for ``integrated``."""
    family = encoder.spec.family
    model = encoder.image_model if family == "conse" else encoder.model
    with encoder.lock:
        x = encoder.to_batch([image])
        if method == "gradinput":
            return _combine(_gradinput_maps(encoder, model, x, query, tuple(layers)))
        if method == "integrated":
            cfg = layers if isinstance(layers, AttributionConfig) else AttributionConfig()
            base = encoder.to_batch([_fill_image(image, cfg.ig_baseline)])
            return _combine(_integrated_maps(encoder, model, x, base, query, tuple(cfg.ig_layers), cfg.ig_steps,
                                             relu=cfg.relu))
        with torch.no_grad():
            fmap = model.forward_features(x).float()
        if method == "eigencam":
            return eigen_cam(fmap[0].flatten(1).T.cpu().numpy()).reshape(fmap.shape[2:])
        if method == "cam":
            return _cnn_cam(encoder, model, fmap, query)
        fmap = fmap.detach().requires_grad_(True)
        q = torch.as_tensor(np.asarray(query, np.float32), device=fmap.device)
        with torch.enable_grad():
            pooled = model.forward_head(fmap, pre_logits=True)
            vec = conse_vector_torch(encoder, model, pooled)[0] if family == "conse" else l2_normalize_torch(pooled[0])
            target = (vec * q).sum()
        return _grad_cam(fmap, target)


def _check_layers(model, layers, method: str) -> list:
    wanted = list(dict.fromkeys(layers))
    bad = [v for v in wanted if v != "input" and not (isinstance(v, int) and 0 <= v < len(model.blocks))]
    if bad or not wanted:
        raise InvalidQueryError(f"{method} layers must be 'input' or stage indices 0..{len(model.blocks) - 1}")
    return wanted


def _forward_with_acts(encoder, model, x: torch.Tensor, layers) -> tuple[dict, torch.Tensor]:
    """Image vectors [n, d] of a batch, and the activations at ``layers`` ("input" is ``x`` itself)."""
    acts: dict = {"input": x}
    h = model.bn1(model.conv_stem(x))
    for i, block in enumerate(model.blocks):
        h = block(h)
        if i in layers:
            acts[i] = h
    pooled = model.forward_head(model.bn2(model.conv_head(h)), pre_logits=True)
    vec = conse_vector_torch(encoder, model, pooled) if encoder.spec.family == "conse" else l2_normalize_torch(pooled)
    return acts, vec


def _gradinput_maps(encoder, model, x: torch.Tensor, query: np.ndarray, layers) -> list[np.ndarray]:
    """Gradient × activation maps (channel sum, positive part) of the cosine target at ``layers``."""
    keys = _check_layers(model, layers, "gradinput")
    q = torch.as_tensor(np.asarray(query, np.float32), device=x.device)
    with torch.enable_grad():
        acts, vec = _forward_with_acts(encoder, model, x.detach().clone().requires_grad_(True), keys)
        grads = torch.autograd.grad((vec[0] * q).sum(), [acts[k] for k in keys])
    return [torch.relu((g * acts[k]).sum(dim=1))[0].detach().double().cpu().numpy() for k, g in zip(keys, grads)]


def _integrated_maps(encoder, model, x: torch.Tensor, base: torch.Tensor, query: np.ndarray, layers,
                     steps: int, relu: bool = True) -> list[np.ndarray]:
    """Integrated-gradients maps (channel sum; positive part with ``relu``) at ``layers``: the
    path-averaged gradient of the cosine target times the activations' difference between the image
    and the baseline. Without ``relu`` the input map sums to ``f(x) - f(base)`` (up to the midpoint
    rule's error)."""
    keys = _check_layers(model, layers, "integrated")
    steps = max(1, int(steps))
    q = torch.as_tensor(np.asarray(query, np.float32), device=x.device)
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    with torch.no_grad():
        ends, _ = _forward_with_acts(encoder, model, torch.cat([x, base]), keys)
    with torch.enable_grad():
        path = (base + alphas.view(-1, 1, 1, 1) * (x - base)).detach().requires_grad_(True)
        acts, vec = _forward_with_acts(encoder, model, path, keys)
        grads = torch.autograd.grad((vec @ q).sum(), [acts[k] for k in keys])
    out = []
    for k, g in zip(keys, grads):
        diff = ends[k][0] - ends[k][1]
        m = (g.mean(dim=0) * diff).sum(dim=0)
        out.append((torch.relu(m) if relu else m).detach().double().cpu().numpy())
    return out


def _cnn_cam(encoder, model, fmap: torch.Tensor, query: np.ndarray) -> np.ndarray:
    """Exact per-cell decomposition (see the module docstring, method "cam")."""
    with torch.no_grad():
        cells = fmap[0].flatten(1).T.double().cpu().numpy()             # [hw, c]
        pooled = model.forward_head(fmap, pre_logits=True)[0].double().cpu().numpy()
        q = np.asarray(query, np.float64).reshape(-1)
        if encoder.spec.family == "conse":
            clf = model.get_classifier()
            probs = torch.softmax(clf(torch.as_tensor(pooled[None], dtype=torch.float32)), -1)[0].numpy()
            t = max(1, min(int(encoder.top_t), probs.shape[0]))
            top = np.argsort(-probs, kind="stable")[:t]
            w = probs[top] / max(float(probs[top].sum()), 1e-12)
            a = w * np.maximum(np.asarray(encoder.class_embeddings, np.float64)[top] @ q, 0.0)
            z = cells @ clf.weight.detach().double().cpu().numpy()[top].T     # [hw, t] per-cell logits
            cam = z @ a
        else:
            cam = cells @ q / (len(cells) * max(float(np.linalg.norm(pooled)), 1e-12))
    return np.maximum(cam, 0.0).reshape(fmap.shape[2:])


def _fill_image(image: Image.Image, fill: str) -> Image.Image:
    rgb = image.convert("RGB")
    if fill == "mean":
        colour = np.asarray(rgb).reshape(-1, 3).mean(axis=0).astype(np.uint8)
        return Image.new("RGB", rgb.size, tuple(int(c) for c in colour))
    if fill == "blur":
        from PIL import ImageFilter

        return rgb.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(rgb.size) / 16.0)))
    raise InvalidQueryError(f"unknown occlusion fill {fill!r}; use one of {', '.join(FILLS)}")


def occlusion_positions(side: int, window: int, stride: int) -> list[int]:
    """Window offsets along one side: every ``stride`` from 0, plus one flush with the far edge."""
    window = max(1, min(int(window), side))
    pos = list(range(0, side - window + 1, max(1, int(stride))))
    if pos[-1] != side - window:
        pos.append(side - window)
    return pos


def occlusion_map(encoder, image: Image.Image, query: np.ndarray,
                  config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """Occlusion sensitivity on the encoder's input grid [S, S]: mean cosine drop of covering windows."""
    q = np.asarray(query, np.float32).reshape(-1)
    x = encoder.to_batch([image])
    fill = encoder.to_batch([_fill_image(image, config.occlusion_fill)])
    _, _, hh, ww = x.shape
    win_h = max(1, int(round(config.occlusion_window * hh)))
    win_w = max(1, int(round(config.occlusion_window * ww)))
    ys = occlusion_positions(hh, win_h, max(1, round(config.occlusion_stride * win_h)))
    xs = occlusion_positions(ww, win_w, max(1, round(config.occlusion_stride * win_w)))
    boxes = [(y, x0) for y in ys for x0 in xs]
    base = float(encoder.encode_images(x)[0] @ q)
    sims = []
    bs = max(1, int(config.batch_size))
    for i in range(0, len(boxes), bs):
        chunk = x.repeat(len(boxes[i:i + bs]), 1, 1, 1)
        for k, (y, x0) in enumerate(boxes[i:i + bs]):
            chunk[k, :, y:y + win_h, x0:x0 + win_w] = fill[0, :, y:y + win_h, x0:x0 + win_w]
        sims.append(encoder.encode_images(chunk) @ q)
    drops = base - np.concatenate(sims).astype(np.float64)
    acc = np.zeros((hh, ww))
    cnt = np.zeros((hh, ww))
    for (y, x0), d in zip(boxes, drops):
        acc[y:y + win_h, x0:x0 + win_w] += d
        cnt[y:y + win_h, x0:x0 + win_w] += 1.0
    return np.maximum(acc / np.maximum(cnt, 1.0), 0.0)


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


def default_method(encoder) -> str:
    fam = encoder.spec.family
    if fam in _VIT:
        return "tokens"
    if fam == "effnet":
        return "integrated"     # best deletion score on the tuning pairs (benchmarks/results/attribution.md)
    if fam == "conse":
        return "occlusion"      # best on the text→image tuning pairs, narrowly (same file)
    if fam == "colour":
        return "colour"         # exact per-pixel shares of the colour match (retrieval.colour.naming)
    raise UnsupportedModalityError(f"encoder {encoder.name!r} has no spatial map to attribute; "
                                   "use a CLIP, DINOv2, effnet-lite0 or conse-effnet-lite0 index")


def attribute_grid(encoder, image: Image.Image, query: np.ndarray | None, method: str = "auto",
                   config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """A heatmap on the encoder's grid [h, w] (not normalised) for ``image`` against ``query``."""
    method = default_method(encoder) if method == "auto" else method
    fam = encoder.spec.family
    if method not in ("tokens", "gradcam", "cam", "gradinput", "integrated", "eigencam", "occlusion", "colour"):
        raise InvalidQueryError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    default_method(encoder)   # raises for encoders without a spatial map
    if method != "eigencam" and query is None:
        raise InvalidQueryError(f"attribution method {method!r} needs a query vector")
    if method == "occlusion":
        return occlusion_map(encoder, image, query, config)
    if (method == "colour") != (fam == "colour"):
        raise InvalidQueryError("attribution method 'colour' is for the colour-names encoder, which takes "
                                "'colour' or 'occlusion'")
    if fam == "colour":
        from retrieval.colour.naming import pixel_contributions

        return pixel_contributions(encoder.to_batch([image]), query)
    if fam in _CNN:
        if method == "tokens":
            raise InvalidQueryError(f"{encoder.name} is a CNN: use method 'integrated', 'gradinput', 'gradcam', "
                                    "'cam', 'occlusion' or 'eigencam'")
        return _cnn_maps(encoder, image, query, method, config if method == "integrated" else config.cnn_layers)
    if method in ("gradcam", "cam", "gradinput", "integrated"):
        raise InvalidQueryError(f"{encoder.name} is a ViT: use method 'tokens', 'occlusion' or 'eigencam'")
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


def match_maps(encoder, query_image: Image.Image, result_image: Image.Image, rerank_config=None
               ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Matched local regions: grid maps (query, result) of RANSAC-inlier mutual-NN matches."""
    from retrieval.rerank.config import DEFAULT_CONFIG
    from retrieval.rerank.verify import verify_pair

    cfg = rerank_config or DEFAULT_CONFIG
    _, tokens, grid = encoder.encode_images_and_local([query_image, result_image])
    h, w = int(grid[0]), int(grid[1])
    pos = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
    res = verify_pair(tokens[0], pos, tokens[1], pos, (h, w), (h, w), cfg)
    keep = res.inlier_mask if res.inliers >= 3 else np.ones(len(res.matches), bool)
    qmap, rmap = np.zeros(h * w), np.zeros(h * w)
    for (i, j), s, k in zip(res.matches, res.match_sims, keep):
        if k:
            qmap[i] += max(float(s), 0.0)
            rmap[j] += max(float(s), 0.0)
    info = {"matches": int(len(res.matches)), "inliers": int(res.inliers), "verified": bool(res.score > 0)}
    return qmap.reshape(h, w), rmap.reshape(h, w), info


# -- engine-level ------------------------------------------------------------------------------
def explain(engine, ctx, result_id: str, *, method: str = "auto", rerank: bool = False,
            result_image: Image.Image | None = None, config: AttributionConfig = AttributionConfig(),
            query_side: bool = True) -> Explanation:
    """Heatmaps for the query ``ctx`` (a ``QueryContext``) and the indexed image ``result_id``.

    ``query_side=False`` skips the query image's map (one attribution pass instead of two).

    ``method="auto"``: the matched local regions for re-ranked image queries (``rerank=True``), else
    token decomposition (ViT), integrated gradients from a mean-colour baseline (``integrated``: effnet-lite0)
    or occlusion (ConSE).
    """
    if method not in METHODS:
        raise InvalidQueryError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    enc = engine.encoder(ctx.encoder)
    engine.hit_for_id(enc.name, result_id)          # unknown id → UnknownIdError (404) before any work
    image = result_image if result_image is not None else engine.load_image(result_id)
    query_image = getattr(ctx, "image", None)
    if query_image is None and getattr(ctx, "image_id", None):
        query_image = engine.load_image(ctx.image_id)
    if method == "auto":
        method = "matches" if (rerank and query_image is not None and enc.has_local_features) else default_method(enc)
    if method == "matches":
        if query_image is None:
            raise InvalidQueryError("attribution method 'matches' needs an image query")
        qmap, rmap, info = match_maps(enc, query_image, image)
        return Explanation(to_image_map(rmap, image.size, crop_box(enc, image.size)), method, enc.name,
                           to_image_map(qmap, query_image.size, crop_box(enc, query_image.size)), info,
                           image, query_image)
    result_map = attribute(enc, image, ctx.vector, method, config)
    query_map = None
    if query_image is not None and query_side:
        hit = engine.hit_for_id(enc.name, result_id)
        result_vec = engine.vectors(enc.name, [hit])[0]
        query_map = attribute(enc, query_image, result_vec, method, config)
    return Explanation(result_map, method, enc.name, query_map, {}, image, query_image)
