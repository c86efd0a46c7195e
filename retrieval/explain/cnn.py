"""Gradient and class-activation maps for the CNN encoders (``effnet-lite0``, ``conse-effnet-lite0``):
Grad-CAM, the exact CAM decomposition, gradient × activation and integrated gradients (see
``retrieval.explain.attribution`` for what each one means)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from retrieval.errors import InvalidQueryError
from retrieval.numeric import l2_normalize_torch

from .config import AttributionConfig, fill_image
from .grid import eigen_cam, legible_map, smooth_map

__all__ = ["conse_vector_torch", "cnn_map"]


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


def cnn_map(encoder, image: Image.Image, query: np.ndarray | None, method: str,
            config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """A CNN encoder's map on its grid (224×224 for the input-level methods, 7×7 for the CAMs)."""
    family = encoder.spec.family
    model = encoder.image_model if family == "conse" else encoder.model
    with encoder.lock:
        x = encoder.to_batch([image])
        if method == "gradinput":
            return _combine(_gradinput_maps(encoder, model, x, query, tuple(config.cnn_layers)))
        if method in ("integrated", "integrated-raw"):
            base = encoder.to_batch([fill_image(image, config.ig_baseline)])
            sigma = config.ig_smooth * x.shape[-1] if method == "integrated" else 0.0
            maps = _integrated_maps(encoder, model, x, base, query, tuple(config.ig_layers), config.ig_steps,
                                    relu=config.relu and sigma <= 0)
            if sigma > 0 and config.relu:    # readable: per-pixel map blended with its smoothed (signed) copy
                maps = [legible_map(m, sigma * m.shape[0] / x.shape[-1], config.ig_blend) for m in maps]
            elif sigma > 0:
                maps = [smooth_map(m, sigma * m.shape[0] / x.shape[-1]) for m in maps]
            return _combine(maps)
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
