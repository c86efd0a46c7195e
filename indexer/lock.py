"""One writer per index: an OS file lock on ``DIR/.lock``, taken with the ``filelock`` package.

``filelock.lock_descriptor`` locks a descriptor Loupe opened itself with the primitive ``filelock.FileLock``
uses: ``flock`` on Unix, ``LockFileEx`` on one byte at offset 0 on Windows. No ``fcntl`` import here, so the
module (and every ``loupe`` command) loads on Windows. The operating system drops the lock when the process
dies (even by SIGKILL), so a crash never leaves a stale lock behind. The lock file holds the writer's pid
after a newline (byte 0 stays free of data: on Windows the locked byte cannot be read by another process),
for the message a second writer prints.

An ``flock`` belongs to the open file description, which a forked child shares: a DataLoader worker
forked while the lock is held would keep it after its parent was killed, until the worker itself exits
(a re-run right after ``kill -9`` was refused). So every forked child closes its copy of the lock's
descriptor at once (``os.register_at_fork``; ``indexer.decode``'s worker init does it again), which
leaves the parent's lock in place. POSIX record locks (``fcntl.lockf``), which a child does not inherit,
are not an option: a process may take them twice, so a second writer in the same process would not be
refused, and closing any descriptor of the file would drop them. ``filelock.FileLock`` itself is not used:
it is re-entrant within a process and keeps its descriptor out of reach of the fork hook.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from retrieval.errors import IndexLockedError

LOCK_NAME = ".lock"
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)

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


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another open file holds it."""
    from filelock import lock_descriptor

    return lock_descriptor(fd, blocking=False)


def _unlock(fd: int) -> None:
    from filelock import unlock_descriptor

    unlock_descriptor(fd)


class IndexLock:
    """``with IndexLock(dir, wait=False):`` — raise ``IndexLockedError`` (or wait) if another holds it."""

    def __init__(self, index_dir: str | os.PathLike, *, wait: bool = False, timeout: float | None = None):
        self.path = Path(index_dir) / LOCK_NAME
        self.wait = wait
        self.timeout = timeout
        self._fd: int | None = None

    def holder(self) -> int | None:
        """The pid written by the process holding the lock (None: none recorded)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(1)                    # byte 0 is the one Windows locks
                text = fh.read(64).decode("ascii", "replace").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _holder(self) -> str:
        pid = self.holder()
        return f" (pid {pid})" if pid is not None else ""

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, _OPEN_FLAGS, 0o644)
        with _held_lock:
            _held.add(fd)                     # from now on a forked child closes its copy
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while not _try_lock(fd):
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
                    raise IndexLockedError(
                        f"{self.path.parent} is being written by another `loupe index`{self._holder()}; "
                        "wait for it to finish, or pass --wait to queue behind it")
                time.sleep(0.2)
        except BaseException:
            with _held_lock:
                _held.discard(fd)
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"\n{os.getpid()}\n".encode())
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
                _unlock(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "IndexLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
