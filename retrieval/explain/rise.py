"""Deletion maps measured on the encoder itself: RISE-style random masks (Petsiuk et al., "RISE: Randomized
Input Sampling for Explanation of Black-box Models", BMVC 2018), read as *deletions*.

Each of ``n`` random masks deletes a random set of cells of a coarse ``grid`` × ``grid`` lattice (each cell
with probability ``p``); the low-resolution mask is upsampled bilinearly with a random sub-cell shift (RISE),
so it is a smooth field ``D`` in [0, 1]: how much of each input pixel is replaced by the image's mean colour
(the "content removed" image that the deletion test and integrated gradients use too). The masked inputs are
embedded in batches and each gives a measured similarity drop ``δ_i = s(x) - s(x_i)``. A pixel's score is
the mean drop of the masks that delete it minus the mean drop of those that keep it (``Σ δ_i D_i / Σ D_i
- Σ δ_i (1 - D_i) / Σ (1 - D_i)``): how much more the similarity falls when that pixel is hidden. Smooth at
the scale of a cell by construction, no gradients, and it measures exactly the question the overlay answers
(which parts, hidden, take the similarity down), non-linear interactions included. Deterministic: the masks
come from a fixed seed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .config import AttributionConfig, fill_image

__all__ = ["random_masks", "masked_drops", "deletion_score", "rise_map"]


def random_masks(n: int, side: int, grid: int, p: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` smooth deletion masks [n, side, side] (float32 in [0, 1]): a (grid+1)² lattice of cells, each
    deleted with probability ``p``, upsampled bilinearly to cells of ``ceil(side / grid)`` px and cropped at a
    random shift of up to one cell (RISE)."""
    import torch.nn.functional as F

    grid = max(1, int(grid))
    cell = int(np.ceil(side / grid))
    low = torch.as_tensor(rng.random((n, 1, grid + 1, grid + 1)) < p, dtype=torch.float32)
    up = F.interpolate(low, size=((grid + 1) * cell, (grid + 1) * cell), mode="bilinear", align_corners=False)
    shifts = rng.integers(0, cell, size=(n, 2))
    out = np.empty((n, side, side), np.float32)
    for i, (dy, dx) in enumerate(shifts):
        out[i] = up[i, 0, dy:dy + side, dx:dx + side].numpy()
    return out


def masked_drops(encoder, x: torch.Tensor, fill: torch.Tensor, query: np.ndarray, masks: np.ndarray,
                 batch_size: int = 16) -> np.ndarray:
    """Similarity drops [n] of the input ``x`` [1, 3, S, S] with each mask's share replaced by ``fill``."""
    q = np.asarray(query, np.float32).reshape(-1)
    base = float(encoder.encode_images(x)[0] @ q)
    sims = []
    bs = max(1, int(batch_size))
    for i in range(0, len(masks), bs):
        d = torch.as_tensor(masks[i:i + bs]).unsqueeze(1)                # [b, 1, S, S]
        sims.append(encoder.encode_images(x * (1.0 - d) + fill * d) @ q)
    return base - np.concatenate(sims).astype(np.float64)


def deletion_score(masks: np.ndarray, drops: np.ndarray) -> np.ndarray:
    """Per pixel [S, S]: mean drop of the masks deleting it minus mean drop of the masks keeping it
    (each mask weighted by how much of the pixel it deletes / keeps). Signed."""
    m = np.asarray(masks, np.float64)
    d = np.asarray(drops, np.float64)
    deleted = m.sum(axis=0)
    kept = (1.0 - m).sum(axis=0)
    hit = np.tensordot(d, m, axes=1)
    miss = d.sum() - hit
    return hit / np.maximum(deleted, 1e-9) - miss / np.maximum(kept, 1e-9)


def rise_map(encoder, image: Image.Image, query: np.ndarray,
             config: AttributionConfig = AttributionConfig()) -> np.ndarray:
    """The deletion map on the encoder's input grid [S, S], signed (see the module docstring)."""
    x = encoder.to_batch([image])
    fill = encoder.to_batch([fill_image(image, "mean")])
    rng = np.random.default_rng(int(config.rise_seed))
    masks = random_masks(int(config.rise_masks), x.shape[-1], int(config.rise_grid), float(config.rise_p), rng)
    drops = masked_drops(encoder, x, fill, query, masks, config.batch_size)
    return deletion_score(masks, drops)
