"""Occlusion sensitivity (Zeiler & Fergus, 2014): the measured similarity drop when a window is hidden."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config import AttributionConfig, fill_image

__all__ = ["occlusion_positions", "occlusion_map"]


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
    fill = encoder.to_batch([fill_image(image, config.occlusion_fill)])
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
