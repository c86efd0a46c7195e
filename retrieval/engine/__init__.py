"""The query engine: opens an index read-only and answers text, image, id, vector and instruction
queries.
"""


from .engine import Engine
from .query import QueryContext, SearchResponse

__all__ = ["Engine", "QueryContext", "SearchResponse"]
