"""Loupe's retrieval library: encoders, index shards, search, re-ranking, attribution,
copy detection and vocabulary-free classification. ``indexer`` and ``server`` build on it.

The names below are loaded on first use (PEP 562), so importing a light submodule (``retrieval.errors``,
``retrieval.settings``, ``retrieval.index.store``) does not import torch: ``loupe --help`` stays fast."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "DEFAULT_ENCODER": "retrieval.encoders",
    "create_encoder": "retrieval.encoders",
    "list_encoders": "retrieval.encoders",
    "register_encoder": "retrieval.encoders",
    "Encoder": "retrieval.encoders.base",
    "LoupeError": "retrieval.errors",
}

__all__ = ["DEFAULT_ENCODER", "Encoder", "LoupeError", "create_encoder", "list_encoders", "register_encoder"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
