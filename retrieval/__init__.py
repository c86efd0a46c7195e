"""Loupe's retrieval library: encoders, index shards, search, re-ranking, attribution,
copy detection and vocabulary-free classification. ``indexer`` and ``server`` build on it."""

from .encoders import DEFAULT_ENCODER, Encoder, create_encoder, list_encoders, register_encoder
from .errors import LoupeError

__version__ = "0.1.0"
__all__ = ["DEFAULT_ENCODER", "Encoder", "LoupeError", "create_encoder", "list_encoders", "register_encoder"]
