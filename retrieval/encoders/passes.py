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

When torch's threads take every core (Loupe's default) the width is 1, yet two calls still finish sooner
side by side with the threads shared out between them: each call's thread sets its own OpenMP team size
(``omp_set_num_threads`` of the runtime torch runs on sets the calling thread's only; torch's other threads
keep theirs). A region query's whole-picture search and feature-map pass (effnet-lite0, 2-core AMD box,
torch at two threads, medians of 40 interleaved rounds): 68.2 ms one after the other, 47.6 ms side by side
with one thread each. A batch of three region crops is not split that way: one batch on two threads took
71.0 ms, one crop per thread 77.9 ms (``retrieval.regions.search.embed_regions`` keeps one batch there).
"""

from __future__ import annotations

import ctypes
import functools
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


@functools.lru_cache(maxsize=None)
def omp_threads_setter() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch runs on (it sets the calling thread's team size
    only), found among the libraries this process mapped (torch's own first); None where it cannot be found
    (no ``/proc``, no OpenMP runtime loaded)."""
    import torch

    try:
        with open("/proc/self/maps") as fh:
            paths = [line.split()[-1] for line in fh if "/" in line]
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    found = [p for p in dict.fromkeys(paths) if os.path.basename(p).startswith(("libgomp", "libiomp5", "libomp"))]
    found.sort(key=lambda p: not p.startswith(torch_dir))
    for path in found:
        try:
            setter = ctypes.CDLL(path).omp_set_num_threads
        except (OSError, AttributeError):
            continue
        setter.argtypes, setter.restype = [ctypes.c_int], None
        return setter
    return None


def plan(encoder, calls: int) -> tuple[int, int | None]:
    """(how many of ``calls`` run at once, the OpenMP threads each gets — None: torch's as they are). The
    width (``width``) when it is more than 1; else, on a CPU whose cores torch's threads all take, the
    calls side by side with those threads shared out (module docstring); else one at a time."""
    import torch

    n = min(width(encoder), calls)
    device = getattr(encoder, "device", None)
    if n > 1 or calls < 2 or (device is not None and getattr(device, "is_cuda", False)):
        return max(1, n), None
    threads, cores = torch.get_num_threads(), cpu_cores()
    if threads < 2 or cores < 2 or omp_threads_setter() is None:
        return 1, None
    n = min(calls, cores, threads)
    return n, max(1, threads // n)


def _with_threads(call: Callable[[], T], threads: int | None) -> Callable[[], T]:
    if threads is None:
        return call

    def run() -> T:
        import torch

        torch.get_num_threads()      # torch sets a new thread's team size on first use: it would undo ours
        omp_threads_setter()(threads)
        return call()

    return run


class Handoff:
    """A value that one call of a ``side_by_side`` batch produces and a later call of the same batch waits
    for (``set`` wraps the producer, ``get`` waits). Safe there because the calls start in order: the
    producer is running or done when the later call starts. None when the producer raised (its exception
    is raised by ``side_by_side``)."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._value = None

    def set(self, call: Callable[[], T]) -> Callable[[], T]:
        def run() -> T:
            try:
                self._value = call()
                return self._value
            finally:
                self._done.set()

        return run

    def get(self):
        self._done.wait()
        return self._value


def side_by_side(encoder, calls: Sequence[Callable[[], T]]) -> list[T]:
    """The results of ``calls`` (in order), run as ``plan`` says in threads holding ``encoder.lock`` between
    them (module docstring); one after the other when the plan is 1 or the encoder has no ``PassLock``. An
    exception of a call is raised here, after all calls ended."""
    lock = getattr(encoder, "lock", None)
    n, threads = plan(encoder, len(calls))
    if n <= 1 or not isinstance(lock, PassLock):
        return [call() for call in calls]
    with lock, ThreadPoolExecutor(n, thread_name_prefix="loupe-pass") as pool:
        futures = [pool.submit(lock.lend(_with_threads(call, threads))) for call in calls]
        return [f.result() for f in futures]

