"""The indexer's host-memory bound: decoded batches in flight are capped by IN_FLIGHT_BYTES."""

from types import SimpleNamespace

import pytest
import torch

from indexer import pipeline
from indexer.pipeline import IN_FLIGHT_BYTES, batch_bytes, iter_batches, prefetch_factor


def _enc(size):
    return SimpleNamespace(spec=SimpleNamespace(image_size=size))


def test_prefetch_factor_caps_bytes_in_flight():
    one = 256 * 3 * 224 * 224                         # a batch of 256 uint8 images at 224 px
    assert prefetch_factor(one, 0) is None            # no workers: no prefetching
    assert prefetch_factor(10_000, 1) == 4            # small batches: the DataLoader's usual depth
    assert prefetch_factor(one, 15) == 1              # 15 workers × 38.5 MB: one batch each
    assert prefetch_factor(one, 7) == IN_FLIGHT_BYTES // (7 * one) == 3
    for workers in (1, 3, 7, 15, 31):
        depth = prefetch_factor(one, workers)
        assert 1 <= depth <= 4
        assert depth == 1 or workers * depth * one <= IN_FLIGHT_BYTES


def test_batch_bytes_counts_every_encoder_input():
    encs = {"a": _enc(224), "b": _enc(336)}
    assert batch_bytes(encs, 8, gpu_decode=False) == 8 * 3 * (224 ** 2 + 336 ** 2)
    assert batch_bytes(encs, 8, gpu_decode=True) < batch_bytes(encs, 8, gpu_decode=False)


@pytest.mark.parametrize("depth", [1, 3])
def test_iter_batches_passes_the_depth_to_the_loader(monkeypatch, depth):
    seen = []
    real = torch.utils.data.DataLoader

    def spy(*args, **kw):
        seen.append(kw["prefetch_factor"])
        return real(*args, **{**kw, "num_workers": 0, "prefetch_factor": None, "worker_init_fn": None})

    monkeypatch.setattr(pipeline.torch.utils.data, "DataLoader", spy)
    monkeypatch.setattr(pipeline, "collate", lambda batch: {"records": list(batch)})
    batches = list(iter_batches(list(range(5)), batch_size=2, workers=2, pin=False, prefetch=depth))
    assert [b["records"] for b in batches] == [[0, 1], [2, 3], [4]]
    assert seen == [depth]
