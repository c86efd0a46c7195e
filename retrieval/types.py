"""Array aliases used across Loupe."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]  # [n, d], L2-normalised rows unless said otherwise
Scores = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


@dataclass
class Hit:
    """One search result: the image ``id``, its ``score`` (inner product = cosine), and where its
    vector lives (``shard`` number, ``row`` within the shard = metadata row)."""

    id: str
    score: float
    shard: int
    row: int
