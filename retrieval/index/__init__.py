"""Index storage and search: the on-disk format (manifest, FAISS shards, Parquet metadata, local
features), per-call search parameters, metadata filters and the records of an opened index.
"""


from .filters import parse_filter
from .records import RecordStore
from .shards import SearchConfig, ShardSet
from .store import Manifest, read_manifest

__all__ = ["Manifest", "read_manifest", "SearchConfig", "ShardSet", "RecordStore", "parse_filter"]
