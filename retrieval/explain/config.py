"""What every attribution method shares: its settings and the "blank" image it compares against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from retrieval.errors import InvalidQueryError

# every attribution method a request may name (retrieval.explain.attribution); here, torch-free, for parsers
METHODS = ("auto", "tokens", "gradcam", "cam", "gradinput", "integrated", "integrated-raw", "eigencam", "occlusion",
           "matches", "colour", "rise")

__all__ = ["AttributionConfig", "FILLS", "fill_image"]

FILLS = ("mean", "blur")


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
    ig_smooth: float = 8 / 224      # integrated: Gaussian sigma (fraction of the input side) of the map shown;
    #                                 "integrated-raw" is the same map unsmoothed (per pixel)
    ig_blend: float = 0.5           # integrated: the per-pixel map's share in the map shown (grid.legible_map)
    rise_masks: int = 64            # rise: random deletion masks (one forward pass each, batched): the quality knob
    rise_grid: int = 12             # rise: cells per side of the masks' coarse lattice (12: 19-px cells at 224 px)
    rise_p: float = 0.3             # rise: probability that a mask deletes a cell
    rise_seed: int = 0              # rise: the masks' seed (maps are deterministic)


def fill_image(image: Image.Image, fill: str) -> Image.Image:
    """The image with its content removed: filled with its mean colour (``"mean"``) or blurred (``"blur"``)."""
    rgb = image.convert("RGB")
    if fill == "mean":
        colour = np.asarray(rgb).reshape(-1, 3).mean(axis=0).astype(np.uint8)
        return Image.new("RGB", rgb.size, tuple(int(c) for c in colour))
    if fill == "blur":
        return rgb.filter(ImageFilter.GaussianBlur(radius=max(2.0, min(rgb.size) / 16.0)))
    raise InvalidQueryError(f"unknown occlusion fill {fill!r}; use one of {', '.join(FILLS)}")
