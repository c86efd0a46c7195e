"""Local-global re-ranking: local descriptors of the query and candidates, mutual matches verified
by RANSAC, fused with the global score.
"""


from .config import DEFAULT_CONFIG, RerankConfig
from .reranker import rerank_hits
from .verify import verify_pair

__all__ = ["RerankConfig", "DEFAULT_CONFIG", "verify_pair", "rerank_hits"]
