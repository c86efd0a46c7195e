"""The index lock (``indexer.lock``) through the ``filelock`` package: no ``fcntl`` import (the CLI loads on
Windows), the holder's pid in the refusal, the lock gone at once after ``kill -9`` — also when the killed
writer had forked a child that still runs — and one writer per directory within one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.lock import IndexLock
from retrieval.errors import IndexLockedError

ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from indexer.lock import IndexLock
lock = IndexLock({dir!r})
lock.acquire()
if {fork}:
    child = os.fork()
    if child == 0:                 # a worker forked while the lock is held: it must not keep it
        time.sleep(30)
        os._exit(0)
    print(child, flush=True)
print("locked", flush=True)
time.sleep(30)
"""


def _hold(tmp_path: Path, *, fork: bool = False) -> tuple[subprocess.Popen, int | None]:
    code = HOLDER.format(root=str(ROOT), dir=str(tmp_path), fork=fork)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline()) if fork else None
    assert proc.stdout.readline().strip() == "locked"
    return proc, child


def _acquire_within(tmp_path: Path, seconds: float) -> float:
    lock, t0 = IndexLock(tmp_path), time.monotonic()
    while True:
        try:
            lock.acquire()
            break
        except IndexLockedError:
            assert time.monotonic() - t0 < seconds, "the lock outlived its killed holder"
            time.sleep(0.01)
    lock.release()
    return time.monotonic() - t0


def test_refusal_names_the_holder_pid_and_kill_9_frees_the_lock(tmp_path):
    proc, _ = _hold(tmp_path)
    try:
        with pytest.raises(IndexLockedError, match=rf"another `loupe index` \(pid {proc.pid}\)"):
            IndexLock(tmp_path).acquire()
        assert IndexLock(tmp_path).holder() == proc.pid
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _acquire_within(tmp_path, 0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    proc, child = _hold(tmp_path, fork=True)
    try:
        with pytest.raises(IndexLockedError):
            IndexLock(tmp_path).acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(child, 0)                   # the forked child still runs ...
        _acquire_within(tmp_path, 0.5)      # ... without the lock
    finally:
        for pid in (proc.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, TypeError):
                pass
        proc.wait()


def test_one_writer_per_directory_within_a_process_and_release_clears_the_pid(tmp_path):
    with IndexLock(tmp_path) as lock:
        assert lock.holder() == os.getpid()
        with pytest.raises(IndexLockedError):
            IndexLock(tmp_path).acquire()
    assert IndexLock(tmp_path).holder() is None
    with IndexLock(tmp_path):
        pass


def test_cli_and_lock_import_without_fcntl():
    """Windows has no ``fcntl``: with it blocked, the lock module imports and the whole parser builds."""
    code = ("import sys; sys.modules['fcntl'] = None\n"
            "import indexer.lock\n"
            "from loupe.cli.main import build_parser\n"
            "build_parser().format_help()\n"
            "assert 'torch' not in sys.modules, 'the parser imported torch'\n"
            "print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
