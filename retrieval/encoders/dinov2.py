"""DINOv2 through transformers (``facebook/dinov2-small|base``); image only.

Global vector: the final layer-normed CLS token (``pooler_output``; set ``"pooling": "cls+mean"`` in
the registry row for CLS concatenated with mean-pooled patches, which doubles ``dim``). Local
features: the layer-normed patch tokens on the (h, w) patch grid.

Preprocessing is transformers' own ``BitImageProcessor`` as configured for DINOv2 (shortest edge 256,
bicubic, centre crop 224, ImageNet mean/std), wrapped in a picklable transform;
tests check parity with ``AutoImageProcessor`` + ``Dinov2Model``.
"""

from __future__ import annotations

import torch
from PIL import Image

from retrieval.encoders.base import Encoder
from retrieval.encoders.weights import resolve_weights


class HFCenterCropTransform:
    """transformers' own DINOv2 image processor (``BitImageProcessor``: shortest edge ``resize``,
    bicubic, centre crop ``crop``, rescale, normalise), wrapped as a picklable ``PIL -> [3, H, W]``
    transform so it runs in DataLoader workers and gives exactly the library's pixels."""

    def __init__(self, resize: int, crop: int, mean, std):
        from transformers import BitImageProcessor

        self.processor = BitImageProcessor(
            do_resize=True, size={"shortest_edge": int(resize)}, resample=3, do_center_crop=True,
            crop_size={"height": int(crop), "width": int(crop)}, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.processor(images=img.convert("RGB"), return_tensors="pt")["pixel_values"][0]


class Dinov2Encoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        from transformers import Dinov2Config, Dinov2Model

        if spec.get("model_config") is not None:  # tiny test models / random speed benchmarks
            torch.manual_seed(int(spec.get("seed", 0)))
            model = Dinov2Model(Dinov2Config(**spec.get("model_config")))
            if spec.get("weights"):
                model.load_state_dict(torch.load(spec.get("weights"), map_location="cpu"))
        else:
            weights = resolve_weights(spec)
            try:  # a save_pretrained() folder, or the hub id (transformers' cache, then the hub)
                model = Dinov2Model.from_pretrained(weights.location)
            except Exception as exc:
                raise weights.error(exc) from exc
        self.model = model.eval().to(device.device)
        self.patch_size = int(self.model.config.patch_size)
        self.pooling = spec.get("pooling", "cls")
        self.preprocess = HFCenterCropTransform(spec.get("resize", 256), spec.image_size,
                                                spec.get("mean"), spec.get("std"))

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(CLS [n, d] (or CLS + mean patch), layer-normed patch tokens [n, p, c], grid)``."""
        x = self.to_batch(batch)
        with self.device.autocast():
            out = self.model(pixel_values=x)
        hidden = out.last_hidden_state  # layer-normed: [n, 1 + p, c]
        cls, patches = out.pooler_output, hidden[:, 1:, :]
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        if self.pooling == "cls+mean":
            cls = torch.cat([cls, patches.mean(dim=1)], dim=-1)
        return cls, patches, grid
