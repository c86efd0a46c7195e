"""One writer per index: an ``fcntl`` lock on ``DIR/.lock``.

The kernel drops the lock when the process dies (even by SIGKILL), so a crash never leaves a stale
lock behind. The lock file holds the writer's pid, for the message a second writer prints.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from retrieval.errors import IndexLockedError

LOCK_NAME = ".lock"


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
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not self.wait or (deadline is not None and time.monotonic() > deadline):
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
