"""Maps as arrays: where the encoder looks in an image (``crop_box``), grid maps upsampled into it, the
grid-level decompositions shared by several encoders, and smoothing a map to the scale a person reads."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["crop_box", "to_image_map", "token_contributions", "eigen_cam", "smooth_map", "smoothness", "seen_mask",
           "legible_map"]


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


def smooth_map(grid_map: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing (``sigma`` in grid cells; 0 keeps the map); reflecting edges, float64."""
    from scipy.ndimage import gaussian_filter

    g = np.asarray(grid_map, np.float64)
    return gaussian_filter(g, float(sigma), mode="reflect") if sigma > 0 else g


def _unit_q(m: np.ndarray, q: float = 0.99) -> np.ndarray:
    top = float(np.quantile(m, q)) if m.size else 0.0
    top = top if top > 0 else float(m.max())
    return np.clip(m / top, 0.0, 1.0) if top > 0 else m


def legible_map(signed: np.ndarray, sigma: float, weight: float = 0.5) -> np.ndarray:
    """A signed per-pixel map made readable: ``weight`` × its positive part plus ``1 - weight`` × the
    positive part of its Gaussian-smoothed copy (``sigma`` in grid cells; the signed map is smoothed, so
    opposite evidence cancels), each scaled by its 99th percentile and clipped to 1. ``weight=0``: the
    smooth map alone; ``sigma=0``: the positive part alone."""
    s = np.asarray(signed, np.float64)
    raw = np.maximum(s, 0.0)
    if sigma <= 0 or weight >= 1:
        return raw
    sm = np.maximum(smooth_map(s, sigma), 0.0)
    if weight <= 0:
        return sm
    return weight * _unit_q(raw) + (1.0 - weight) * _unit_q(sm)


def smoothness(heat: np.ndarray, sigma_frac: float = 0.03) -> float:
    """Pearson correlation of a map with a Gaussian-blurred copy of itself (sigma ``sigma_frac`` of the
    shorter side): near 1 for a map smooth at that scale, low for per-pixel speckle; 1.0 for a flat map."""
    h = np.asarray(heat, np.float64)
    b = smooth_map(h, sigma_frac * min(h.shape))
    if h.std() == 0 or b.std() == 0:
        return 1.0
    return float(np.corrcoef(h.ravel(), b.ravel())[0, 1])


def seen_mask(size: tuple[int, int], box: tuple[float, float, float, float] | None) -> np.ndarray:
    """bool [H, W]: True inside the region the encoder sees (``crop_box``), for an image of ``size`` (W, H)."""
    w, h = int(size[0]), int(size[1])
    out = np.zeros((h, w), bool)
    if box is None:
        out[:] = True
        return out
    left, top, right, bottom = (int(round(v)) for v in box)
    out[max(0, top):min(h, bottom), max(0, left):min(w, right)] = True
    return out
