"""Instruction-conditioned (composed) queries: an image plus a text instruction.

First composition (owned here, improved by the instruction issue): the normalised weighted sum of
the normalised image vector and the instruction's text vector.
"""

from __future__ import annotations

import numpy as np

from .encoders.base import l2_normalize

DEFAULT_INSTRUCTION_WEIGHT = 0.5


def compose_query(image_vec: np.ndarray, text_vec: np.ndarray, *, weight: float = DEFAULT_INSTRUCTION_WEIGHT,
                  method: str = "sum", **_: object) -> np.ndarray:
    """``normalise((1 - w) * image + w * text)``; ``weight`` in [0, 1]. Returns a unit float32 vector."""
    img = l2_normalize(np.asarray(image_vec, dtype=np.float32).reshape(1, -1))[0]
    txt = l2_normalize(np.asarray(text_vec, dtype=np.float32).reshape(1, -1))[0]
    w = float(weight)
    return l2_normalize(((1.0 - w) * img + w * txt)[None])[0]
