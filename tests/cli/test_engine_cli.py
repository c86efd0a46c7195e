"""`loupe search` end to end: a real subprocess (id query) and in-process runs (text/image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _engine_helpers import build_index, build_photo_index, unit

from loupe.cli.main import main as loupe_main

ROOT = Path(__file__).resolve().parents[2]


def test_loupe_search_json_subprocess(tmp_path):
    vecs = unit(np.random.default_rng(0).standard_normal((40, 8)))
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[15, 25])
    from retrieval.engine.engine import Engine

    target = Engine(out).records.shard_ids[1][4]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "loupe", "search", str(out), "--id", target, "-k", "3", "--json"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    body = json.loads(proc.stdout)
    assert [set(r) >= {"id", "score", "path", "caption", "metadata"} for r in body["results"]] == [True] * 3
    assert body["results"][0]["id"] == target and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert body["results"][0]["caption"] == "image 19"
    # errors: one line on stderr, exit 2
    proc = subprocess.run([sys.executable, "-m", "loupe", "search", str(out), "--id", "0123456789abcde"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "unknown image id" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "loupe", "search", str(tmp_path / "none"), "--id", target],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2 and "not a Loupe index" in proc.stderr


def test_loupe_search_text_and_image(tmp_path, tiny_clip, photo_dir, capsys):
    paths = sorted(photo_dir.iterdir())
    out = build_photo_index(tmp_path / "photos", paths, [tiny_clip], shard_sizes=[5, len(paths) - 5])
    assert loupe_main(["search", str(out), "--text", "+a cat", "--text", "-a dog", "-k", "4", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert len(body["results"]) == 4
    query = next(p for p in paths if p.stem == "astronaut")
    assert loupe_main(["search", str(out), "--image", str(query), "-k", "2", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["results"][0]["path"] == str(query.resolve())
    assert loupe_main(["search", str(out), "--image", str(query), "--instruction", "at night", "-k", "2"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("  1. ")
    assert loupe_main(["search", str(out), "--text", "x", "--filter", "{bad"]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert loupe_main(["search", str(out), "--image", str(tmp_path / "missing.jpg")]) == 2
    assert loupe_main(["search", str(out), "--text", "x", "-k", "0"]) == 2


def test_disk_full_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    import errno

    import indexer.pipeline

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "idx" / "meta" / "shard-00000.parquet"))

    monkeypatch.setattr(indexer.pipeline, "build_index", full)
    assert loupe_main(["index", str(tmp_path), "--out", str(tmp_path / "idx"), "--encoder", "effnet-lite0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "run the same command again" in err[0]
