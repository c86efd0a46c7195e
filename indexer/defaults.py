"""Defaults of a ``loupe index`` run, in a module that imports no torch (``loupe index --help`` reads them)."""

from __future__ import annotations

import os

DEFAULT_SHARD_SIZE = 100_000
DEFAULT_BATCH_SIZE = 64
DEFAULT_COMMIT_SECONDS = 300.0


def default_workers() -> int:
    """DataLoader decode processes: every core but one, at most 32."""
    return max(1, min(32, (os.cpu_count() or 2) - 1))
