"""An encoder's forward passes: one at a time, or a few side by side for one caller.

``PassLock`` is each encoder's ``lock``. Forward passes take it, so a threaded server runs one pass of an
encoder at a time, and attribution (``retrieval.explain``) holds it while its hooks sit on the model.

``side_by_side(encoder, calls)`` runs independent calls that use the encoder (its forward passes, or a whole
search that embeds a query) in threads at once, holding the lock for all of them: other callers wait as for
one long pass, and no hook can be put on the model meanwhile (the passes themselves are thread-safe: the
models run in eval mode and keep no state between calls). On a CPU where torch's intra-op threads leave
cores idle, a one-picture pass of a small CNN does not use them (effnet-lite0 on a 2-core machine: one pass
29.8 ms with one thread, 24.1 ms with two; two passes one after the other 69.7 ms, in two threads 39.8 ms),
so a query that needs several passes (search by region: the whole picture, its feature map, the region
crops) gets its answer sooner. ``width(encoder)`` passes at most run at once: the CPU cores over torch's
threads; one on a GPU (its passes are short and queue on one device anyway).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


class PassLock:
    """A re-entrant lock that a holder can lend to the threads it runs with ``side_by_side``: in those
    threads acquiring it succeeds at once (the holder keeps it until they are done)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._lent = threading.local()

    def _is_lent(self) -> bool:
        return getattr(self._lent, "depth", 0) > 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._is_lent():
            return True
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        if not self._is_lent():
            self._lock.release()

    def __enter__(self) -> "PassLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def lend(self, call: Callable[[], T]) -> Callable[[], T]:
        """``call`` run as if it held this lock (for a thread started by its holder)."""

        def run() -> T:
            self._lent.depth = getattr(self._lent, "depth", 0) + 1
            try:
                return call()
            finally:
                self._lent.depth -= 1

        return run


def cpu_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):        # not Linux
        return max(1, os.cpu_count() or 1)


def width(encoder) -> int:
    """How many of ``encoder``'s passes ``side_by_side`` runs at once: 1 on a GPU; on a CPU, the cores
    torch's intra-op threads leave (cores // threads, at least 1)."""
    import torch

    device = getattr(encoder, "device", None)
    if device is not None and getattr(device, "is_cuda", False):
        return 1
    return max(1, cpu_cores() // max(1, torch.get_num_threads()))


def side_by_side(encoder, calls: Sequence[Callable[[], T]]) -> list[T]:
    """The results of ``calls`` (in order), run ``width(encoder)`` at a time in threads holding
    ``encoder.lock`` between them (module docstring); one after the other when the width is 1 or the encoder
    has no ``PassLock``. An exception of a call is raised here, after all calls ended."""
    lock = getattr(encoder, "lock", None)
    n = min(width(encoder), len(calls))
    if n <= 1 or not isinstance(lock, PassLock):
        return [call() for call in calls]
    with lock, ThreadPoolExecutor(n, thread_name_prefix="loupe-pass") as pool:
        futures = [pool.submit(lock.lend(call)) for call in calls]
        return [f.result() for f in futures]

