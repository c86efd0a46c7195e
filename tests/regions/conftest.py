"""One small real index for the region tests (``regions_data``), built once by ``loupe index --regions``
with the offline effnet-lite0 encoder."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from regions_data import INDEXED, poster

from loupe.cli.main import main as loupe_main


@pytest.fixture(scope="session")
def region_index(tmp_path_factory, photos):
    """(index dir, the `loupe index --regions` JSON summary)."""
    root = tmp_path_factory.mktemp("regions")
    folder = root / "pictures"
    folder.mkdir()
    for name in INDEXED:
        photos[name].save(folder / f"{name}.png")
    poster(photos).save(folder / "poster.png")
    out = root / "idx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = loupe_main(["index", str(folder), "--out", str(out), "--encoder", "effnet-lite0", "--regions",
                           "--workers", "0", "--batch-size", "8"])
    assert code == 0
    return out, json.loads(buf.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="session")
def region_engine(region_index):
    from retrieval.engine import Engine

    engine = Engine(region_index[0], device="cpu")
    yield engine
    engine.close()
