"""Index storage and search: the on-disk format (manifest, FAISS shards, Parquet metadata, local
features), per-call search parameters, metadata filters and the records of an opened index.
"""


from .filters import parse_filter
from .params import SearchConfig
from .store import Manifest, read_manifest

__all__ = ["Manifest", "read_manifest", "SearchConfig", "parse_filter"]
