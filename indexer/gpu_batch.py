"""``--decode gpu``: JPEGs decoded in batches on the encoder's device (``indexer.gpu_decode``, nvJPEG on CUDA).

DataLoader workers then only read, hash and parse the JPEG header (``gpu_decodable``); the main
process decodes, resizes, crops and normalises each batch on the GPU. Anything the GPU path should not
take goes through the normal CPU path in the workers: non-JPEG files, JPEGs with an EXIF rotation,
CMYK/YCCK JPEGs, files without an end-of-image marker (truncated), images over the pixel limit (so
the reason is reported exactly as on the CPU path). A JPEG the GPU decoder refuses is decoded on the
CPU in the main process (``retrieval.images.load_image``), or reported as failed.

Vectors from the GPU path are close to, not bit-identical with, the CPU path (another resampling
implementation): build an index with one path.
"""

from __future__ import annotations

import io

import torch
from PIL import Image

from retrieval import images, settings


def gpu_decodable(data: bytes, max_pixels: int | None) -> tuple[int, int] | None:
    """(width, height) when ``data`` is a JPEG the GPU path decodes exactly like the CPU path, else None."""
    from indexer.gpu_decode import is_jpeg

    if not is_jpeg(data) or not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - the CPU path reports the reason
        return None
    limit = settings.max_pixels() if max_pixels is None else max_pixels
    if (limit and w * h > limit) or img.mode not in ("RGB", "L") or orientation not in (None, 1):
        return None
    return w, h


def decode_raw(records, encoders: dict, transforms: list, max_pixels: int | None, device: torch.device
               ) -> tuple[dict, dict]:
    """Decode the batch's raw JPEGs for every encoder's transform config.

    Returns ``(decoded, fallback)``: ``decoded[cfg] = (tensor [m, 3, s, s] on device, {record index: row})``
    and ``fallback[record index] = tensors per CPU transform group`` for JPEGs the GPU refused.
    Records that fail on the CPU as well get ``error`` set.
    """
    from indexer.gpu_decode import GpuTransformConfig, decode_batch
    from retrieval.errors import LoupeError

    raw = [r for r in records if r.raw is not None]
    decoded: dict = {}
    fallback: dict = {}
    if not raw:
        return decoded, fallback
    blobs = [r.raw for r in raw]
    failed: set[int] = set()
    for cfg in dict.fromkeys(GpuTransformConfig.from_spec(e.spec) for e in encoders.values()):
        tensor, ok, bad = decode_batch(blobs, cfg, device)
        decoded[cfg] = (tensor, {raw[p].index: row for row, p in enumerate(ok)})
        failed |= {raw[p].index for p in bad}
    for rec in raw:
        if rec.index in failed:
            try:
                img = images.load_image(rec.raw, max_pixels=max_pixels)
                rec.width, rec.height = img.size
                fallback[rec.index] = tuple(t(img) for t in transforms)
            except LoupeError as exc:
                rec.error = str(exc)
            except Exception as exc:  # noqa: BLE001
                rec.error = f"{type(exc).__name__}: {exc}"
        rec.raw = None
    return decoded, fallback
