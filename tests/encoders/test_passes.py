"""An encoder's passes side by side (``retrieval.encoders.passes``): the lock lent to the caller's threads,
calls really concurrent when the CPU has room, results in order and equal to one pass after the other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from retrieval.encoders import passes
from retrieval.encoders.passes import Handoff, PassLock, side_by_side


class _Enc:
    """Just what ``side_by_side`` looks at: a ``PassLock`` and a CPU device."""

    def __init__(self):
        self.lock = PassLock()
        self.device = None


def test_calls_run_at_once_holding_the_lock(monkeypatch):
    monkeypatch.setattr(passes, "width", lambda enc: 2)
    enc = _Enc()
    both = threading.Barrier(2, timeout=10)      # each call waits for the other: one after the other would fail
    outsider = []

    def call(i):
        both.wait()
        with enc.lock:                           # lent: re-taking the encoder's lock inside does not block
            pass
        if i == 0:                               # another thread cannot take the lock meanwhile
            t = threading.Thread(target=lambda: outsider.append(enc.lock.acquire(blocking=False)))
            t.start()
            t.join()
        return i * 10

    assert side_by_side(enc, [lambda: call(0), lambda: call(1)]) == [0, 10]
    assert outsider == [False]
    assert enc.lock.acquire(blocking=False)      # released afterwards
    enc.lock.release()


def test_a_plan_of_one_runs_in_order_on_the_callers_thread(monkeypatch):
    monkeypatch.setattr(passes, "plan", lambda enc, calls: (1, None))
    seen = []
    out = side_by_side(_Enc(), [lambda i=i: seen.append((i, threading.get_ident())) or i for i in range(3)])
    assert out == [0, 1, 2] and [s[0] for s in seen] == [0, 1, 2]
    assert {s[1] for s in seen} == {threading.get_ident()}


def test_an_error_is_raised_after_all_calls_ended(monkeypatch):
    monkeypatch.setattr(passes, "width", lambda enc: 2)
    finished = threading.Event()

    def slow():
        threading.Event().wait(0.2)
        finished.set()
        return 1

    def bad():
        raise ValueError("broken picture")

    with pytest.raises(ValueError, match="broken picture"):
        side_by_side(_Enc(), [bad, slow])
    assert finished.is_set()


@pytest.mark.parametrize("width", [1, 2, 3])
def test_a_later_call_waits_for_an_earlier_ones_value(monkeypatch, width):
    """``Handoff``: the last call of a batch uses what the first one produced, one at a time or side by side
    (where the producer is still running when the consumer starts); side by side, a producer's error reaches
    it as None."""
    monkeypatch.setattr(passes, "plan", lambda enc, calls: (min(width, calls), None))
    first = Handoff()

    def produce():
        threading.Event().wait(0.2)              # still running when the consumer starts (width > 1)
        return 21

    assert side_by_side(_Enc(), [first.set(produce), lambda: 1, lambda: first.get() * 2]) == [21, 1, 42]

    failed = Handoff()

    def bad():
        raise ValueError("broken picture")

    seen = []
    with pytest.raises(ValueError, match="broken picture"):
        side_by_side(_Enc(), [failed.set(bad), lambda: seen.append(failed.get())])
    assert seen == ([None] if width > 1 else [])   # one at a time: the error ends the batch at once


def test_width_counts_the_cores_torch_leaves(monkeypatch):
    import torch

    enc = _Enc()
    monkeypatch.setattr(passes, "cpu_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert passes.width(enc) == 4
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert passes.width(enc) == 1

    class Cuda:
        is_cuda = True

    enc.device = Cuda()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert passes.width(enc) == 1


def test_the_plan_shares_torchs_threads_out_when_they_take_every_core(monkeypatch):
    import torch

    enc = _Enc()
    monkeypatch.setattr(passes, "cpu_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(passes, "omp_threads_setter", lambda: (lambda n: None))
    assert passes.plan(enc, 2) == (2, 1) and passes.plan(enc, 3) == (2, 1)
    assert passes.plan(enc, 1) == (1, None)
    monkeypatch.setattr(passes, "cpu_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert passes.plan(enc, 2) == (2, 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert passes.plan(enc, 2) == (2, None) and passes.plan(enc, 9) == (4, None)    # the width: torch's own
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(passes, "cpu_cores", lambda: 1)
    assert passes.plan(enc, 2) == (1, None)                     # one core: nothing to share
    monkeypatch.setattr(passes, "cpu_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(passes, "omp_threads_setter", lambda: None)
    assert passes.plan(enc, 2) == (1, None)                     # no OpenMP runtime found

    class Cuda:
        is_cuda = True

    monkeypatch.setattr(passes, "omp_threads_setter", lambda: (lambda n: None))
    enc.device = Cuda()
    assert passes.plan(enc, 2) == (1, None)


def test_a_calls_thread_gets_its_share_of_threads_and_the_callers_keep_theirs():
    """The real OpenMP runtime: the share is set in the call's thread only."""
    import torch

    if passes.omp_threads_setter() is None:
        pytest.skip("no OpenMP runtime found in this process")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        t = threading.Thread(target=passes._with_threads(lambda: seen.append(torch.get_num_threads()), 1))
        t.start()
        t.join()
        other = []                                # a thread that takes no share keeps torch's count
        t = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [1] and other == [2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_real_passes_side_by_side_equal_one_batch(effnet, photos, monkeypatch):
    """effnet-lite0 crops embedded in two threads at once give the vectors of one batch."""
    from retrieval.regions.search import embed_regions

    image = photos["astronaut"]
    boxes = [(0, 0, 200, 200), (100, 50, 400, 300), (250, 250, 500, 500)]
    monkeypatch.setattr(passes, "width", lambda enc: 1)
    one = embed_regions(effnet, image, boxes)
    monkeypatch.setattr("retrieval.regions.search.width", lambda enc: 2)
    monkeypatch.setattr(passes, "width", lambda enc: 2)
    two = embed_regions(effnet, image, boxes)
    np.testing.assert_allclose(two, one, atol=1e-5)
    ref = effnet.encode_images([image.crop(b) for b in boxes])
    np.testing.assert_allclose(one, ref, atol=1e-5)


def test_one_query_per_thread_quiets_the_blas_libraries():
    """`loupe serve`'s setting: numpy's and faiss's BLAS at one thread (their idle threads spin on the
    encoder's cores); restored afterwards for the other tests."""
    import faiss
    from threadpoolctl import ThreadpoolController

    from retrieval.device import one_query_per_thread

    controller = ThreadpoolController()
    before = {lib.filepath: lib.num_threads for lib in controller.lib_controllers}
    faiss_before = faiss.omp_get_max_threads()
    try:
        one_query_per_thread()
        blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
        assert blas and all(lib.num_threads == 1 for lib in blas)
        assert faiss.omp_get_max_threads() == 1
    finally:
        for lib in controller.lib_controllers:
            lib.set_num_threads(before[lib.filepath])
        faiss.omp_set_num_threads(faiss_before)
