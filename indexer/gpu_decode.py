"""Decode and resize JPEGs on the GPU (nvJPEG via ``torchvision.io.decode_jpeg``).

On a fast GPU the encoder is no longer the bottleneck of indexing: a ViT-B/32 forward pass in fp16
runs at ~20,000 images/s on an H200, while PIL decode + resize on 15 CPU workers gives ~1,800/s
(``benchmarks/RESULTS.md``). With ``--decode gpu`` the DataLoader workers only read and hash the
bytes; JPEGs are decoded in batches on the GPU, resized (bicubic, antialiased: the same filter family
as the CPU transforms), centre-cropped and normalised there. Files that nvJPEG cannot decode
(progressive CMYK, PNG, ...) fall back to the CPU path, one by one.

Vectors from the GPU path differ slightly from the CPU path (different resampling
implementations); they are not bit-identical, so an index should be built with one path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from retrieval.encoders.base import EncoderSpec


@dataclass(frozen=True)
class GpuTransformConfig:
    resize: int          # shortest edge after resize
    crop: int            # centre crop (square)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    squash: bool = False  # resize the whole image to crop × crop (no centre crop): colour-names

    @classmethod
    def from_spec(cls, spec: EncoderSpec) -> "GpuTransformConfig":
        crop = int(spec.image_size)
        if spec.family == "colour":          # [0, 1] pixels of the whole image, as its CPU ColourTransform
            return cls(crop, crop, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), squash=True)
        crop_pct = float(spec.get("crop_pct", 1.0) or 1.0)
        resize = int(spec.get("resize") or int(crop / crop_pct))
        mean = tuple(spec.get("mean") or (0.48145466, 0.4578275, 0.40821073))
        std = tuple(spec.get("std") or (0.26862954, 0.26130258, 0.27577711))
        return cls(resize, crop, mean, std)


def is_jpeg(data: bytes | memoryview) -> bool:
    return len(data) > 3 and bytes(data[:3]) == b"\xff\xd8\xff"


def resize_crop(img: torch.Tensor, cfg: GpuTransformConfig) -> torch.Tensor:
    """uint8 [3, H, W] → float [3, crop, crop]: shortest edge to ``resize``, centre crop, [0, 1]."""
    _, h, w = img.shape
    if cfg.squash:
        x = F.interpolate(img[None].float(), size=(cfg.crop, cfg.crop), mode="area")[0]
        return x.clamp_(0, 255).div_(255.0)
    if h <= w:
        nh, nw = cfg.resize, max(1, int(cfg.resize * w / h))
    else:
        nh, nw = max(1, int(cfg.resize * h / w)), cfg.resize
    x = F.interpolate(img[None].float(), size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = max(0, int(round((nh - cfg.crop) / 2.0))), max(0, int(round((nw - cfg.crop) / 2.0)))
    x = x[:, top:top + cfg.crop, left:left + cfg.crop]
    if x.shape[1] != cfg.crop or x.shape[2] != cfg.crop:  # smaller than the crop: pad
        x = F.pad(x, (0, cfg.crop - x.shape[2], 0, cfg.crop - x.shape[1]))
    return x.clamp_(0, 255).div_(255.0)


def _decode_jpeg(*args, **kwargs):
    import warnings

    from torchvision.io import decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 announces a move to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(*args, **kwargs)


def decode_batch(blobs: list[bytes], cfg: GpuTransformConfig, device: torch.device | str
                 ) -> tuple[torch.Tensor | None, list[int], list[int]]:
    """Decode JPEG bytes on ``device`` into a normalised batch.

    Returns ``(batch [m, 3, crop, crop] or None, ok_positions, failed_positions)``: the positions of
    ``blobs`` that made it into the batch, and those the caller must decode on the CPU instead.
    """
    from torchvision.io import ImageReadMode

    positions = [i for i, b in enumerate(blobs) if is_jpeg(b)]
    failed = [i for i, b in enumerate(blobs) if not is_jpeg(b)]
    if not positions:
        return None, [], failed
    tensors = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in positions]
    try:
        images = _decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batch: retry one by one
        images = []
        for t in tensors:
            try:
                images.append(_decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images.append(None)
    ok = [p for p, img in zip(positions, images) if img is not None]
    failed += [p for p, img in zip(positions, images) if img is None]
    if not ok:
        return None, [], sorted(failed)
    mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)
    batch = torch.stack([resize_crop(img, cfg) for img in images if img is not None])
    return (batch - mean) / std, ok, sorted(failed)
