"""The engine's faiss-gpu path for IVF-PQ layouts (``retrieval.index.faiss_gpu``), on the CPU.

faiss-cpu has no GPU code, so ``index_cpu_to_gpu`` is replaced by a stand-in that keeps the CPU index and
checks each call the way a GPU index would refuse it (more than 2,048 candidates or lists, an id selector,
parameters that are not IVF ones). What is tested is Loupe's side: which layouts go to the GPU, that every
unfiltered search goes there with the tuned parameters and gives the CPU's answer, and what falls back to
the CPU. The real GPU path is checked on a GPU machine (benchmarks/RESULTS.md)."""

from __future__ import annotations

import logging

import faiss
import numpy as np
import pytest
from _engine_helpers import build_index, unit

from retrieval.engine.engine import Engine
from retrieval.index.faiss_gpu import GPU_MAX_K
from retrieval.index.optimize import optimize


class StandInGpuIndex:
    """What ``index_cpu_to_gpu`` returns here: the CPU index, searched with the checks a GPU index makes."""

    def __init__(self, index, log):
        self.cpu, self.log = index, log
        self.fail = False

    def search(self, q, k, params=None):
        # around a projection, the IVF's parameters (SWIG hands ``index_params`` back as the base class:
        # the Python object Loupe keeps alive beside it is the one passed down)
        inner = params._keep if isinstance(params, faiss.SearchParametersPreTransform) else params
        assert isinstance(inner, faiss.SearchParametersIVF), "GPU IVF indexes take SearchParametersIVF"
        assert inner.sel is None and (params.sel is None), "no id selectors on the GPU path"
        assert k <= GPU_MAX_K and inner.nprobe <= GPU_MAX_K, "faiss GPU k-selection limit"
        if self.fail:
            raise RuntimeError("Error: 'err == cudaSuccess' failed: out of memory")
        self.log.append((len(q), k, inner.nprobe))
        return self.cpu.search(q, k, params=params)


@pytest.fixture
def stand_in_gpu(monkeypatch):
    calls, copies, options = [], [], []

    class Options:
        useFloat16 = False

    def to_gpu(resources, device, index, co):
        options.append((device, co.useFloat16))
        copies.append(StandInGpuIndex(index, calls))
        return copies[-1]

    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "GpuClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    return calls, copies, options


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    centres = unit(np.random.default_rng(5 + dim).standard_normal((16, dim)))
    rng = np.random.default_rng(seed)
    return unit(centres[rng.integers(0, 16, n)] + 0.3 * rng.standard_normal((n, dim)))


@pytest.mark.parametrize("kind", ["ivfpq", "ivfpq-pca"])
def test_an_ivfpq_layout_is_searched_through_the_gpu_copy_with_the_cpu_answers(tmp_path, stand_in_gpu, kind):
    calls, copies, options = stand_in_gpu
    dim = 256 if kind == "ivfpq-pca" else 32
    vecs = clustered(3000, dim, 1)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1500, 1500])
    info = optimize(out, layout=kind, target_recall=0.9, queries=120).encoders["e"]
    assert info["layout"] == kind
    cpu = Engine(out, device="cpu")
    gpu = Engine(out, device="cpu", search_device="cuda:1")
    layout = gpu.shards.layouts["e"]
    assert layout.gpu is not None and cpu.shards.layouts["e"].gpu is None
    assert options == [(1, True)]                    # GPU 1 of cuda:1; float16 distance tables
    assert layout.gpu.pretransform == (kind == "ivfpq-pca")
    tuned = layout.entry.params
    for qi in (0, 5, 1234, 2999):
        q = unit(vecs[qi] + 0.05 * np.random.default_rng(qi).standard_normal(dim))
        before = len(calls)
        got = gpu.search_vector("e", q, 10)
        assert len(calls) == before + 1 and calls[-1] == (1, 10 * tuned["k_factor"], tuned["nprobe"])
        want = cpu.search_vector("e", q, 10)
        assert [(h.id, h.score) for h in got] == [(h.id, h.score) for h in want]
    # a filtered search (id selector) and one over the GPU's k limit stay on the CPU, with the same answers
    q = vecs[7]
    before = len(calls)
    even = {"group": "even"}
    want = [h.id for h in cpu.search_vector("e", q, 10, filter=even)]
    assert [h.id for h in gpu.search_vector("e", q, 10, filter=even)] == want and len(want) == 10
    big = GPU_MAX_K // tuned["k_factor"] + 1
    assert [h.id for h in gpu.search_vector("e", q, big)] == [h.id for h in cpu.search_vector("e", q, big)]
    assert len(calls) == before
    # a GPU error: this search and the later ones run on the CPU
    copies[-1].fail = True
    assert [h.id for h in gpu.search_vector("e", q, 10)] == [h.id for h in cpu.search_vector("e", q, 10)]
    copies[-1].fail = False
    gpu.search_vector("e", q, 10)
    assert len(calls) == before
    cpu.close()
    gpu.close()


def test_layouts_without_a_faiss_gpu_index_and_machines_without_faiss_gpu_stay_on_the_cpu(
        tmp_path, stand_in_gpu, monkeypatch, caplog):
    calls, copies, _ = stand_in_gpu
    vecs = clustered(2000, 32, 2)
    out = build_index(tmp_path / "idx", {"e": vecs}, shard_sizes=[1000, 1000])
    optimize(out, layout="hnsw", target_recall=0.9, queries=100)
    with caplog.at_level(logging.INFO, logger="retrieval.index.faiss_gpu"):
        engine = Engine(out, device="cpu", search_device="cuda")
    assert engine.shards.layouts["e"].gpu is None and not copies
    assert "hnsw layouts have no faiss GPU index" in caplog.text
    engine.search_vector("e", vecs[0], 10)
    engine.close()
    optimize(out, layout="ivfpq", target_recall=0.9, queries=100)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)       # faiss-gpu installed, no GPU visible
    engine = Engine(out, device="cpu", search_device="cuda")
    assert engine.shards.layouts["e"].gpu is None and not copies
    engine.close()
    engine = Engine(out, device="cpu", search_device="torch-cpu")  # not a CUDA device: torch only
    assert engine.shards.layouts["e"].gpu is None and not calls
    engine.close()
