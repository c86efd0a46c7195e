"""``kill -9`` of a running ``loupe index`` with decode workers: the lock is free at once, the workers die.

DataLoader workers are forked from the indexer: before issue 18 they inherited the lock's open file
description (an ``flock`` lives until every process holding it closes it) and outlived their parent by
up to torch's watchdog interval (5 s), so a re-run right after the kill was refused ("being written by
another `loupe index`"). Now the lock's descriptor is closed in every forked child
(``indexer.lock``) and each worker asks the kernel for SIGKILL when its parent dies
(``indexer.decode._worker_init``: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.lock import IndexLock
from retrieval.errors import IndexLockedError

HELPER = Path(__file__).resolve().parents[1] / "_indexer_helpers.py"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, prctl")]


@pytest.fixture(scope="module")
def specs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("specs") / "specs.json"
    path.write_text("{}")             # PDQ only: a built-in encoder, no model to load
    return path


@pytest.fixture(scope="module")
def many_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    rng = np.random.default_rng(0)
    for i in range(240):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    return folder


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")


def start_indexer(specs_file, source, out, workers: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(HELPER.parent.parent), OMP_NUM_THREADS="1")
    config = {"sources": [str(source)], "out": str(out), "encoders": ["pdq"], "shard_size": 1000,
              "batch_size": 2, "workers": workers, "commit_seconds": 0}
    cmd = [sys.executable, str(HELPER), str(specs_file), json.dumps(config), "--slow", "0.3"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def test_kill_9_frees_the_lock_at_once_and_takes_the_workers_along(tmp_path, specs_file, many_images):
    out = tmp_path / "idx"
    proc = start_indexer(specs_file, many_images, out, workers=2)
    try:
        deadline = time.monotonic() + 120
        workers: set[int] = set()
        while len(workers) < 2 or not (out / "manifest.json").exists():   # decoding, and committing slowly
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the decode workers never started"
            time.sleep(0.05)
            workers = children(proc.pid)
        with pytest.raises(IndexLockedError):
            IndexLock(out).acquire()              # held by the running indexer
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)                      # the parent is gone (its descriptors are closed)
        t0 = time.monotonic()
        lock = IndexLock(out)
        while True:
            try:
                lock.acquire()
                break
            except IndexLockedError:
                if time.monotonic() - t0 > 0.5:
                    orphans = sorted(p for p in workers if alive(p))
                    raise AssertionError(f"the lock is still held {time.monotonic() - t0:.1f} s after kill -9 "
                                         f"(orphaned decode workers: {orphans})") from None
                time.sleep(0.01)
        took = time.monotonic() - t0
        lock.release()
        t1 = time.monotonic()
        while any(alive(p) for p in workers) and time.monotonic() - t1 < 1.0:
            time.sleep(0.01)
        left = sorted(p for p in workers if alive(p))
        assert not left, f"decode workers {left} outlived their killed parent"
        print(f"lock re-acquired {took * 1e3:.0f} ms after kill -9; workers gone {time.monotonic() - t1:.2f} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in [p for p in locals().get("workers", ()) if alive(p)]:
            os.kill(pid, signal.SIGKILL)          # orphans of the unfixed code: do not leave them behind
