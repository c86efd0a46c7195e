"""Loupe's indexer: embed image corpora into FAISS shards (``loupe index``).

Stages: ``sources`` (read) → ``decode`` (DataLoader workers) → ``pipeline`` (encode in batches) →
``writer`` (shards via ``retrieval.store``, in a background thread); ``index_types`` picks the FAISS
index; ``lock`` keeps one writer per index directory.
"""

from indexer.pipeline import IndexConfig, IndexSummary, build_index, stored_vectors

__all__ = ["IndexConfig", "IndexSummary", "build_index", "stored_vectors"]
