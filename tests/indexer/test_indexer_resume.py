"""The indexer killed with SIGKILL at many moments, then re-run: every input exactly once.

``build_index`` runs in a subprocess (the driver in ``tests/_indexer_helpers.py``, which registers the
tiny CLIP there); most runs use the PDQ encoder, which needs no model and starts in a couple of
seconds. ``crash="point:k"`` makes the driver's ``checkpoint`` callback SIGKILL the process the k-th
time the writer reaches ``point`` (after a shard's vectors / local features / metadata / alias rewrite
/ manifest, or during prune), so each window of the commit protocol is hit deterministically; a
further test kills it from outside at random moments while ``slow`` widens the windows.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from retrieval.index import descriptors, store, vector_files

HELPER = Path(__file__).resolve().parents[1] / "_indexer_helpers.py"
pytestmark = pytest.mark.slow   # subprocesses: each run imports torch afresh


@pytest.fixture(scope="module")
def specs_file(tmp_path_factory, tiny_clip):
    from retrieval.encoders import get_spec

    spec = get_spec(tiny_clip)
    row = dict(spec.options, family=spec.family, dim=spec.dim, modalities=list(spec.modalities),
               image_size=spec.image_size, local=spec.local, offline=True)
    path = tmp_path_factory.mktemp("specs") / "specs.json"
    path.write_text(json.dumps({tiny_clip: row}))
    return path


@pytest.fixture
def corpus(photo_dir):
    # a copy of the first photo sorts last: its alias lands in an already committed shard
    first = sorted(photo_dir.iterdir())[0]
    shutil.copy(first, photo_dir / f"zz-copy{first.suffix}")
    return photo_dir


def run_index(specs_file, source, out, *, crash=None, slow=None, wait=True, encoder="pdq", **config):
    """The driver in a subprocess: ``build_index`` with ``config`` (IndexConfig fields) over small shards
    and batches; ``crash``/``slow`` go to its checkpoint callback."""
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent), OMP_NUM_THREADS="1")
    config = {"sources": [str(source)], "out": str(out), "encoders": [encoder], "shard_size": 2, "batch_size": 2,
              "workers": 0, **config}
    cmd = [sys.executable, str(HELPER), str(specs_file), json.dumps(config)]
    cmd += ["--crash", crash] if crash else []
    cmd += ["--slow", str(slow)] if slow else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not wait:
        return proc
    out_s, err_s = proc.communicate(timeout=300)
    return proc.returncode, out_s, err_s


def check_readable(out) -> list[dict]:
    """Every shard the manifest lists is complete and consistent; returns all rows."""
    if not (Path(out) / "manifest.json").exists():
        return []
    m = store.read_manifest(out)
    rows = []
    for sh in m.shards:
        meta = store.read_metadata(out, sh.name).to_pylist()
        assert len(meta) == sh.count
        for name, entry in m.encoders.items():
            binary = entry.index_type == "binary"
            assert vector_files.read_vectors(out, name, sh.name, binary=binary).ntotal == sh.count
            if entry.local_features:
                assert len(descriptors.LocalShard(out, name, sh.name).off) == sh.count + 1
        rows.extend(meta)
    assert m.count == len(rows)
    return rows


def check_complete(out, source) -> list[dict]:
    rows = check_readable(out)
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    covered = [s for r in rows for s in [r["source"], *json.loads(r["aliases"] or "[]")]]
    files = sorted(str(p) for p in Path(source).iterdir())
    assert sorted(covered) == files, "every input exactly once"
    expected_ids = {store.content_id(store.sha256_bytes(Path(f).read_bytes())) for f in files}
    assert set(ids) == expected_ids
    m = store.read_manifest(out)
    listed = {sh.name for sh in m.shards}
    for folder in [Path(out) / "meta", *(Path(out) / e for e in m.encoders)]:
        leftovers = {p.name for p in folder.iterdir()
                     if p.name.startswith("shard-") and p.name.split(".")[0] not in listed}
        assert not leftovers and not [p for p in folder.iterdir() if p.name.startswith(".")]
    return rows


def _crash_then_check(specs_file, corpus, out, crash, encoder="pdq", **config):
    rc, _, err = run_index(specs_file, corpus, out, crash=crash, encoder=encoder, **config)
    assert rc == -signal.SIGKILL, (crash, err)
    return check_readable(out)              # the state a reader sees after the crash


def test_resume_after_sigkill_at_every_commit_point(tmp_path, specs_file, corpus):
    """One index, killed in turn inside each window of the commit protocol, then finished; then a
    prune killed half-way and finished. (PDQ: a real encoder that starts fast in a subprocess.)"""
    out = tmp_path / "idx"
    counts = []
    for crash in ("vectors:1",    # first shard's vectors written, nothing committed
                  "manifest:1",   # right after a commit
                  "meta:2",       # a shard's metadata written, manifest not yet
                  "alias:1"):     # an older shard's aliases rewritten, manifest not yet
        counts.append(len(_crash_then_check(specs_file, corpus, out, crash)))
    assert counts[0] == 0 and counts[1] == 2 and counts[2] == 4 and counts[3] >= 4
    rc, stdout, err = run_index(specs_file, corpus, out, encoder="pdq")
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    rows = check_complete(out, corpus)
    assert summary["indexed"] == len(rows) - counts[-1] and summary["failed"] == []
    assert store.read_manifest(out).encoders["pdq"].index_type == "binary"

    victims = sorted(p for p in corpus.iterdir() if not p.name.startswith("zz"))[1:6]
    for p in victims:
        p.unlink()
    _crash_then_check(specs_file, corpus, out, "prune:2", prune=True)
    rc, stdout, err = run_index(specs_file, corpus, out, prune=True, encoder="pdq")
    assert rc == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["indexed"] == 0
    check_complete(out, corpus)


def test_resume_after_sigkill_during_time_based_commits(tmp_path, specs_file, corpus):
    """--commit-every 0: each batch rewrites the open shard under a new number; killed right after the
    manifest swapped versions (the old version's files still on disk) and while a new version was
    half written, the index stays readable and the next run completes it with full shards."""
    out = tmp_path / "idx"
    counts = []
    for crash in ("manifest:2", "meta:2"):
        counts.append(len(_crash_then_check(specs_file, corpus, out, crash, commit_seconds=0, shard_size=5)))
    assert counts[0] == 4                    # two batches of 2, both in the open shard's second version
    rc, stdout, err = run_index(specs_file, corpus, out, commit_seconds=0, shard_size=5)
    assert rc == 0, err
    rows = check_complete(out, corpus)       # also: no files of replaced versions left behind
    sizes = [sh.count for sh in store.read_manifest(out).shards]
    assert sum(sizes) == len(rows) and max(sizes) <= 5
    assert len(sizes) <= 2 + -(-(len(rows) - counts[1]) // 5)   # each crash leaves ≤ 1 small shard


def test_resume_after_sigkill_while_writing_local_features(tmp_path, specs_file, corpus):
    out = tmp_path / "idx"
    assert len(_crash_then_check(specs_file, corpus, out, "local:2", local_features=True,
                                 encoder="test-clip-tiny")) == 2
    rc, stdout, err = run_index(specs_file, corpus, out, local_features=True, encoder="test-clip-tiny")
    assert rc == 0, err
    rows = check_complete(out, corpus)
    assert json.loads(stdout.strip().splitlines()[-1])["indexed"] == len(rows) - 2
    assert store.read_manifest(out).encoders["test-clip-tiny"].local_features["grid"] == [4, 4]


def test_resume_after_random_sigkills(tmp_path, specs_file, corpus):
    out = tmp_path / "idx"
    rng = random.Random(1234)
    kills = 0
    for _ in range(2):
        proc = run_index(specs_file, corpus, out, slow=0.2, wait=False)
        deadline = time.monotonic() + 120
        start_count = store.read_manifest(out).count if (out / "manifest.json").exists() else -1
        while time.monotonic() < deadline and proc.poll() is None:   # wait for a first commit of this run
            if (out / "manifest.json").exists() and store.read_manifest(out).count != start_count:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
        check_readable(out)
    assert kills == 2
    rc, stdout, err = run_index(specs_file, corpus, out)
    assert rc == 0, err
    check_complete(out, corpus)
