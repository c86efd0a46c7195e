"""Loupe's retrieval library: encoders, index shards, search, re-ranking, attribution,
copy detection and vocabulary-free classification. ``indexer`` and ``server`` build on it."""

from retrieval.encoders import DEFAULT_ENCODER, create_encoder, list_encoders, register_encoder
from retrieval.encoders.base import Encoder
from retrieval.errors import LoupeError

__all__ = ["DEFAULT_ENCODER", "Encoder", "LoupeError", "create_encoder", "list_encoders", "register_encoder"]
