"""The query engine: opens an index read-only and answers ``SearchRequest``s (text, image, id, vector and
instruction queries), composed of a records store, a shard set and an embedder.
"""

from .engine import Engine
from .query import QueryContext, SearchResponse
from .request import MAX_K, SearchRequest

__all__ = ["Engine", "SearchRequest", "SearchResponse", "QueryContext", "MAX_K"]
