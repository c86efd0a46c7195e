"""A local Ray cluster for the distributed tests (module-scoped: started once, shut down after) and a
small corpus of seeded synthetic pictures."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """``ray.init`` on this machine: 2 CPUs, a 300 MB object store, no dashboard; everything stopped after."""
    ray.init(num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - Serve may never have started
            pass
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 seeded pictures (coloured blocks and noise), JPEG and PNG."""
    rng = np.random.default_rng(7)
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(24):
        base = rng.integers(0, 255, size=3)
        img = np.clip(base + rng.normal(0, 40, size=(48 + i, 64, 3)), 0, 255).astype(np.uint8)
        img[: 10 + i, : 20 + i] = rng.integers(0, 255, size=3)
        Image.fromarray(img).save(folder / (f"img{i:02d}.jpg" if i % 2 else f"img{i:02d}.png"))
    return folder
