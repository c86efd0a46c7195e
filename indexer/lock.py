"""One writer per index: an ``fcntl`` lock on ``DIR/.lock``.

The kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves a stale
lock behind. The lock file holds the writer's pid, for the message a second writer prints.

An ``flock`` belongs to the open file description, which a forked child shares: a DataLoader worker
forked while the lock is held would keep it after its parent was killed, until the worker itself exits
(a re-run right after ``kill -9`` was refused). So every forked child closes its copy of the lock's
descriptor at once (``os.register_at_fork``; ``indexer.decode``'s worker init does it again), which
leaves the parent's lock in place. POSIX record locks (``fcntl.lockf``), which a child does not inherit,
are not an option: a process may take them twice, so a second writer in the same process would not be
refused, and closing any descriptor of the file would drop them. (The ``filelock`` package uses
``flock`` as well on Unix, so it would need the same care.)
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from retrieval.errors import IndexLockedError

LOCK_NAME = ".lock"

_held: set[int] = set()          # descriptors of the locks this process holds
_held_lock = threading.Lock()


def close_inherited_locks() -> None:
    """In a forked child: close the copies of the parent's lock descriptors, so that the locks go with the
    parent (the parent's own descriptors keep them). Idempotent; called after every ``os.fork``."""
    global _held_lock
    _held_lock = threading.Lock()             # another thread of the parent may have held it at the fork
    for fd in list(_held):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=close_inherited_locks)


class IndexLock:
    """``with IndexLock(dir, wait=False):`` — raise ``IndexLockedError`` (or wait) if another holds it."""

    def __init__(self, index_dir: str | os.PathLike, *, wait: bool = False, timeout: float | None = None):
        self.path = Path(index_dir) / LOCK_NAME
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f" (pid {pid})" if pid else ""

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        with _held_lock:
            _held.add(fd)                     # from now on a forked child closes its copy
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    with _held_lock:
                        _held.discard(fd)
                    os.close(fd)
                    raise IndexLockedError(
                        f"{self.path.parent} is being written by another `loupe index`{self._holder()}; "
                        "wait for it to finish, or pass --wait to queue behind it") from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with _held_lock:
                mine = self._fd in _held          # not in a forked child, which closed its copy
                _held.discard(self._fd)
            if not mine:
                self._fd = None
                return
            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "IndexLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
