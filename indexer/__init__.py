"""Loupe's indexer: embed image corpora into FAISS shards (``loupe index``).

``pipeline.build_index`` plans a run and joins three stages with ``runner.run_stages``, which times
each: the reader (``sources`` lists and reads items, ``decode`` decodes them in DataLoader workers,
``gpu_batch``/``gpu_decode`` on the GPU), the mapper (``embed``: every encoder over each batch) and
the writer (``writer``: shards via ``retrieval.index.store``, in a background thread). ``distributed``
runs the reader and the embedding on Ray actors; ``index_types`` picks the FAISS index; ``lock`` keeps
one writer per index directory.
"""

from indexer.pipeline import IndexConfig, build_index, stored_vectors
from indexer.runner import IndexSummary

__all__ = ["IndexConfig", "IndexSummary", "build_index", "stored_vectors"]
