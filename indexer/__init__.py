"""Loupe's indexer: embed image corpora into FAISS shards (``loupe index``).

``pipeline.build_index`` plans a run and joins three stages with ``runner.run_stages``, which times
each: the reader (``sources`` lists and reads items, ``decode`` decodes them in DataLoader workers,
``gpu_batch``/``gpu_decode`` on the GPU), the mapper (``embed``: every encoder over each batch) and
the writer (``writer``: shards via ``retrieval.index.store``, in a background thread). ``distributed``
runs the reader and the embedding on Ray actors; ``index_types`` picks the FAISS index; ``lock`` keeps
one writer per index directory.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"IndexConfig": "indexer.pipeline", "build_index": "indexer.pipeline", "stored_vectors": "indexer.pipeline",
         "IndexSummary": "indexer.runner"}

__all__ = ["IndexConfig", "IndexSummary", "build_index", "stored_vectors"]


def __getattr__(name: str) -> Any:
    """The names above, loaded on first use (``indexer.defaults`` and ``indexer.lock`` import no torch)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'indexer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
