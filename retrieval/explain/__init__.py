"""Attribution: which regions of a result made it match a query (Grad-CAM, Eigen-CAM, token
contributions, integrated gradients, occlusion), and the overlays drawn from them (legend, pair view).

Names are loaded on first use (PEP 562): ``retrieval.explain.config`` (the method names) imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"explain": ".attribution", "attribute": ".attribution", "METHODS": ".config", "overlay_png": ".overlay",
         "pair_png": ".pair"}

__all__ = ["explain", "attribute", "METHODS", "overlay_png", "pair_png"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval.explain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
