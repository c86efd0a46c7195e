"""Loupe: an image retrieval engine.

>>> import loupe
>>> loupe.build_index(loupe.IndexConfig(sources=["~/Pictures"], out="~/loupe-index", encoders=["conse-effnet-lite0"]))
>>> engine = loupe.Engine("~/loupe-index")
>>> engine.search(loupe.SearchRequest(text="a dog on a beach", k=10)).ids
>>> app = loupe.create_app(engine=engine)          # the HTTP API and web page (Flask)

The names load on first use, so ``import loupe`` stays cheap (no torch or faiss until needed).
The library lives in ``retrieval`` (encoders, index, engine, re-ranking, ...), indexing in ``indexer``,
the HTTP server in ``server`` and the ``loupe`` command in ``loupe.cli``.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Engine": "retrieval.engine",
    "SearchRequest": "retrieval.engine",
    "SearchResponse": "retrieval.engine",
    "create_encoder": "retrieval.encoders",
    "list_encoders": "retrieval.encoders",
    "build_index": "indexer",
    "IndexConfig": "indexer",
    "create_app": "server",
    "LoupeError": "retrieval.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loupe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
