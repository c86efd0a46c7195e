"""The ``Encoder`` interface every family adapter implements."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from retrieval.device import DeviceConfig
from retrieval.errors import UnsupportedModalityError
from retrieval.images import load_image
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

    def describe(self) -> dict[str, Any]:
        weights = (self.get("weights_source") or self.get("weights") or self.get("weights_package") or
                   (f"{self.get('arch')}/{self.get('pretrained')}" if self.get("pretrained") else None) or
                   self.get("hub_id") or ("none (algorithmic)" if self.family == "pdq" else None))
        return {"name": self.name, "dim": self.dim, "modalities": list(self.modalities), "weights": weights,
                "offline": self.offline, "family": self.family, "local_features": self.local is not None}


def l2_normalize(x: np.ndarray | torch.Tensor, eps: float = 1e-12) -> Vectors:
    """Rows to unit length, as float32 numpy."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, eps)).astype(np.float32, copy=False)


class Encoder:
    """Embeds images (and texts, where supported) into L2-normalised float32 rows.

    * ``preprocess``: a picklable callable ``PIL.Image -> tensor [3, H, W]`` (safe in DataLoader
      workers; it does not hold the model).
    * ``encode_images(batch)``: ``batch`` is a preprocessed tensor ``[n, 3, H, W]`` or a list of PIL
      images / paths / bytes; returns ``[n, dim]`` float32, rows of unit length.
    * ``encode_texts(texts)``: ``[n, dim]`` for text-capable encoders.
    * ``local_features(batch)``: ``(tokens [n, p, c], (h, w))`` float32 with unit-length rows, for
      encoders with a spatial map (ViT patch tokens, CNN feature-map cells), row-major over the grid.
    """

    spec: EncoderSpec
    device: DeviceConfig
    preprocess: Callable[[Image.Image], torch.Tensor]

    def __init__(self, spec: EncoderSpec, device: DeviceConfig):
        self.spec = spec
        self.device = device
        # Forward passes are serialised per encoder: safe under a threaded server.
        self.lock = threading.RLock()

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
    def binary(self) -> bool:
        return bool(self.spec.get("binary", False))

    #: local descriptor layers this encoder can store (``loupe index --local-layer``): "final" is the
    #: map ``encode_images_and_local`` returns; encoders with a finer one also implement
    #: ``encode_images_and_fine`` (one forward pass: global, final tokens + grid, fine tokens + grid)
    local_layers: tuple[str, ...] = ("final",)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} dim={self.dim} device={self.device.device}>"

    # -- batching helpers ----------------------------------------------------------------------
    def to_batch(self, batch: torch.Tensor | Sequence[Any]) -> torch.Tensor:
        """Preprocess a list of images (PIL / path / bytes) into a tensor on the device."""
        if not isinstance(batch, torch.Tensor):
            tensors = [self.preprocess(img if isinstance(img, Image.Image) else load_image(img)) for img in batch]
            if not tensors:
                raise ValueError("encode_images() needs at least one image")
            batch = torch.stack(tensors)
        non_blocking = self.device.is_cuda and batch.is_pinned()
        return batch.to(self.device.device, non_blocking=non_blocking)

    # -- to implement --------------------------------------------------------------------------
    def encode_images(self, batch: torch.Tensor | Sequence[Any]) -> Vectors:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> Vectors:
        raise UnsupportedModalityError(
            f"encoder {self.name!r} embeds images only; use a text-capable encoder "
            "(clip-vit-b-32, clip-vit-l-14 or the offline conse-effnet-lite0) for text queries"
        )

    def local_features(self, batch: torch.Tensor | Sequence[Any]) -> tuple[Vectors, tuple[int, int]]:
        raise UnsupportedModalityError(f"encoder {self.name!r} has no spatial feature map for local features")
