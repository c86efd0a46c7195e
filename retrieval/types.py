"""Array aliases used across Loupe."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]  # [n, d], L2-normalised rows unless said otherwise
Scores = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]
