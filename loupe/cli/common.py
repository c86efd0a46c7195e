"""Helpers shared by the `loupe` subcommands."""

from __future__ import annotations

from pathlib import Path


def read_image_file(path: str | Path) -> bytes:
    """The bytes of an image file named on the command line; a clear error if it cannot be read."""
    from retrieval.errors import InvalidImageError

    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from None
