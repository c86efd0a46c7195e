"""The ``Encoder`` interface every family adapter implements, and the pixel transform several share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from retrieval.device import DeviceConfig
from retrieval.encoders.passes import PassLock
from retrieval.errors import UnsupportedModalityError
from retrieval.images import load_image, to_rgb
from retrieval.numeric import l2_normalize
from retrieval.types import Vectors


@dataclass(frozen=True)
class EncoderSpec:
    """One row of ``registry.json``: what an encoder is, as data."""

    name: str
    family: str
    dim: int
    modalities: tuple[str, ...]
    image_size: int = 224
    offline: bool = False
    local: str | None = None
    extra: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # every other key of the row

    @classmethod
    def from_row(cls, name: str, row: dict[str, Any]) -> "EncoderSpec":
        row = dict(row)
        known = {k: row.pop(k) for k in ("family", "dim", "modalities", "image_size", "offline", "local", "extra")
                 if k in row}
        known["modalities"] = tuple(known.get("modalities", ("image",)))
        return cls(name=name, options=row, **known)

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    @property
    def input_side(self) -> int:
        """The shorter side the preprocessing resizes an image to before any crop (``resize``, else
        ``image_size / crop_pct``): images far larger are decoded reduced (``load_image(min_side=...)``)."""
        return int(math.ceil(self.get("resize") or self.image_size / float(self.get("crop_pct") or 1.0)))

    def describe(self) -> dict[str, Any]:
        weights = (self.get("weights_source") or self.get("weights") or self.get("weights_package") or
                   (f"{self.get('arch')}/{self.get('pretrained')}" if self.get("pretrained") else None) or
                   self.get("hub_id") or ("none (algorithmic)" if self.family == "pdq" else None))
        return {"name": self.name, "dim": self.dim, "modalities": list(self.modalities), "weights": weights,
                "offline": self.offline, "family": self.family, "local_features": self.local is not None}


class SquareResize:
    """PIL image → uint8 pixels of the whole image resized to ``size`` × ``size`` (no crop; the aspect
    ratio is not kept), ``[H, W, 3]`` or, with ``channels_first``, ``[3, H, W]``. The input of encoders
    that take raw pixels: PDQ and SSCD (bilinear, HWC), colour-names (box filter, CHW). Picklable (it
    runs in DataLoader workers); other modes are made RGB by :func:`retrieval.images.to_rgb`."""

    FILTERS = {"bilinear": Image.Resampling.BILINEAR, "box": Image.Resampling.BOX,
               "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}

    def __init__(self, size: int, resample: str = "bilinear", channels_first: bool = False):
        if resample not in self.FILTERS:
            raise ValueError(f"unknown resample filter {resample!r}; known: {', '.join(self.FILTERS)}")
        self.size = int(size)
        self.resample = resample
        self.channels_first = bool(channels_first)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img).resize((self.size, self.size), self.FILTERS[self.resample])
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8))
        return pixels.permute(2, 0, 1) if self.channels_first else pixels

    def __repr__(self) -> str:
        return f"SquareResize({self.size}, {self.resample!r}, channels_first={self.channels_first})"


class Encoder:
    """Embeds images (and texts, where supported) into L2-normalised float32 rows.

    * ``preprocess``: a picklable callable ``PIL.Image -> tensor [3, H, W]`` (uint8 ``[H, W, 3]`` for the
      raw-pixel encoders, :class:`SquareResize`), safe in DataLoader workers: it does not hold the model.
    * ``encode_images(batch)``: ``batch`` is a preprocessed tensor ``[n, 3, H, W]`` or a list of PIL
      images / paths / bytes, each normalised by :func:`retrieval.images.load_image` (any mode → RGB,
      transparency on white, EXIF orientation, the size limits) and decoded no larger than this encoder
      needs (``input_side``); returns ``[n, dim]`` float32, rows of unit length.
    * ``encode_texts(texts)``: ``[n, dim]`` for text-capable encoders.
    * ``local_features(batch)``: ``(tokens [n, p, c], (h, w))`` float32 with unit-length rows, for
      encoders with a spatial map (ViT patch tokens, CNN feature-map cells), row-major over the grid.

    Encoders with a spatial map implement ``_forward(batch)`` (preprocess, then one forward pass under
    autocast: ``(pooled [n, d], tokens [n, p, c], (h, w))`` before normalisation; callers hold ``lock``),
    and inherit ``encode_images``, ``encode_images_and_local`` and ``local_features``. Others override
    ``encode_images``.
    """

    spec: EncoderSpec
    device: DeviceConfig
    preprocess: Callable[[Image.Image], torch.Tensor]

    def __init__(self, spec: EncoderSpec, device: DeviceConfig):
        self.spec = spec
        self.device = device
        # Forward passes are serialised per encoder: safe under a threaded server (``passes.py``).
        self.lock = PassLock()

    # -- description ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.spec.modalities

    @property
    def supports_text(self) -> bool:
        return "text" in self.spec.modalities

    @property
    def has_local_features(self) -> bool:
        return self.spec.local is not None

    @property
    def input_side(self) -> int:
        """The shorter side ``preprocess`` resizes an image to (:attr:`EncoderSpec.input_side`)."""
        return self.spec.input_side

    @property
    def binary(self) -> bool:
        return bool(self.spec.get("binary", False))

    #: local descriptor layers this encoder can store (``loupe index --local-layer``): "final" is the
    #: map ``encode_images_and_local`` returns; encoders with a finer one also implement
    #: ``encode_images_and_fine`` (one forward pass: global, final tokens + grid, fine tokens + grid)
    local_layers: tuple[str, ...] = ("final",)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} dim={self.dim} device={self.device.device}>"

    # -- batching helpers ----------------------------------------------------------------------
    def pixels(self, batch: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """A list of images (PIL of any mode / path / bytes) normalised by ``load_image`` (as a path would
        be: RGB, EXIF orientation, limits; decoded reduced to ``input_side``), preprocessed and stacked on
        the CPU; a tensor (already preprocessed) is returned as it is."""
        if isinstance(batch, torch.Tensor):
            return batch
        tensors = [self.preprocess(load_image(img, min_side=self.input_side)) for img in batch]
        if not tensors:
            raise ValueError("encode_images() needs at least one image")
        return torch.stack(tensors)

    def to_batch(self, batch: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Preprocess a list of images (PIL / path / bytes) into a tensor on the device."""
        batch = self.pixels(batch)
        non_blocking = self.device.is_cuda and batch.is_pinned()
        return batch.to(self.device.device, non_blocking=non_blocking)

    def uint8_pixels(self, batch: torch.Tensor | Sequence[Any]) -> np.ndarray:
        """The batch as contiguous uint8 numpy pixels (for models that take raw pixels: PDQ, SSCD)."""
        arr = self.pixels(batch).cpu().numpy()
        if arr.dtype != np.uint8:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(arr)

    # -- spatial encoders implement _forward; the rest override encode_images ---------------------
    def _forward(self, batch: torch.Tensor | Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        raise UnsupportedModalityError(f"encoder {self.name!r} has no spatial feature map for local features")

    @torch.inference_mode()
    def encode_images(self, batch: torch.Tensor | Sequence[Any]) -> Vectors:
        with self.lock:
            pooled, _, _ = self._forward(batch)
        return l2_normalize(pooled)

    @torch.inference_mode()
    def encode_images_and_local(self, batch: torch.Tensor | Sequence[Any]) -> tuple[Vectors, Vectors, tuple[int, int]]:
        """Global vectors and local tokens (unit rows) from one forward pass."""
        with self.lock:
            pooled, tokens, grid = self._forward(batch)
        return l2_normalize(pooled), l2_normalize(tokens), grid

    def encode_texts(self, texts: Sequence[str]) -> Vectors:
        raise UnsupportedModalityError(
            f"encoder {self.name!r} embeds images only; use a text-capable encoder "
            "(clip-vit-b-32, clip-vit-l-14 or the offline conse-effnet-lite0) for text queries"
        )

    def local_features(self, batch: torch.Tensor | Sequence[Any]) -> tuple[Vectors, tuple[int, int]]:
        _, tokens, grid = self.encode_images_and_local(batch)
        return tokens, grid
