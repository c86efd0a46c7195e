"""Copy detection (SSCD/DISC21 style): matching query images against an index with background
normalisation and local verification, and whole-index near-duplicate search.
"""


from .collection import CopyCheckConfig, dedup_index
from .dedup import DedupConfig, deduplicate
from .match import choose_encoder, match_images
from .scores import MatchConfig

__all__ = ["MatchConfig", "match_images", "choose_encoder", "DedupConfig", "deduplicate", "CopyCheckConfig",
           "dedup_index"]
