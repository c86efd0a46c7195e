"""Shared fixtures: no network, tiny seeded CLIP/DINOv2 encoders, real sample photos.

* Network access is blocked for the whole session (loopback and Unix sockets stay allowed).
* ``tiny_clip`` / ``tiny_dino`` register small randomly initialised encoders (seeded, weights saved to
  a temp file) under the names ``test-clip-tiny`` / ``test-dinov2-tiny``; they run in milliseconds.
* ``photos``: real photos bundled with scikit-image, as RGB PIL images.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_CLIP_ARCH = "loupe-test-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_DINO_CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "patch_size": 14, "image_size": 56}


# -- network guard ---------------------------------------------------------------------------
class NetworkBlocked(RuntimeError):
    pass


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX path
        return True
    host = address[0]
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


@pytest.fixture(autouse=True, scope="session")
def block_network():
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def guard(address):
        if not _is_local(address):
            raise NetworkBlocked(f"tests may not use the network (tried {address!r})")

    def connect(self, address):
        guard(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        guard(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in (None, "localhost") and not _is_local((str(host), 0)):
            raise socket.gaierror(f"tests may not resolve {host!r} (network blocked)")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = getaddrinfo
    yield
    socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
    socket.getaddrinfo = real_getaddrinfo


# -- tiny encoders ---------------------------------------------------------------------------
def _register_tiny_clip(tmp_dir) -> str:
    import open_clip

    from retrieval.encoders import register_encoder
    from retrieval.encoders.clip import _register_arch

    _register_arch(TINY_CLIP_ARCH, TINY_CLIP_CONFIG)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP_ARCH, pretrained=None)
    weights = os.path.join(tmp_dir, "tiny-clip.pt")
    torch.save(model.state_dict(), weights)
    register_encoder("test-clip-tiny", {
        "family": "clip", "arch": TINY_CLIP_ARCH, "weights": weights, "model_config": TINY_CLIP_CONFIG,
        "image_size": 64, "dim": 32, "modalities": ["image", "text"], "local": "patch_tokens", "offline": True,
    }, replace=True)
    return weights


def _register_tiny_dino(tmp_dir) -> str:
    from transformers import Dinov2Config, Dinov2Model

    from retrieval.encoders import register_encoder

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(**TINY_DINO_CONFIG))
    weights = os.path.join(tmp_dir, "tiny-dino.pt")
    torch.save(model.state_dict(), weights)
    register_encoder("test-dinov2-tiny", {
        "family": "dinov2", "model_config": TINY_DINO_CONFIG, "weights": weights, "pooling": "cls",
        "image_size": 56, "resize": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "dim": 32, "modalities": ["image"], "local": "patch_tokens", "offline": True,
    }, replace=True)
    return weights


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Name of a registered tiny random CLIP encoder (32-d, 64 px, 4x4 patches)."""
    _register_tiny_clip(str(tmp_path_factory.mktemp("tiny-clip")))
    return "test-clip-tiny"


@pytest.fixture(scope="session")
def tiny_clip_weights(tmp_path_factory, tiny_clip) -> str:
    from retrieval.encoders import get_spec

    return get_spec(tiny_clip).get("weights")


@pytest.fixture(scope="session")
def tiny_dino(tmp_path_factory) -> str:
    """Name of a registered tiny random DINOv2 encoder (32-d, 56 px, 4x4 patches)."""
    _register_tiny_dino(str(tmp_path_factory.mktemp("tiny-dino")))
    return "test-dinov2-tiny"


@pytest.fixture(scope="session")
def tiny_dino_weights(tiny_dino) -> str:
    from retrieval.encoders import get_spec

    return get_spec(tiny_dino).get("weights")


# -- images ----------------------------------------------------------------------------------
def skimage_photos() -> dict[str, Image.Image]:
    from retrieval.testing.samples import skimage_photos as photos

    return photos()


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photos bundled with scikit-image (name -> RGB image)."""
    return skimage_photos()


@pytest.fixture
def photo_dir(tmp_path, photos):
    """A folder of the bundled photos as JPEG/PNG files (name.jpg)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, (name, img) in enumerate(photos.items()):
        img.save(folder / (f"{name}.jpg" if i % 2 == 0 else f"{name}.png"))
    return folder


@pytest.fixture(scope="session")
def effnet():
    from retrieval.encoders import create_encoder

    return create_encoder("effnet-lite0", device="cpu")


@pytest.fixture(scope="session")
def conse():
    from retrieval.encoders import create_encoder

    return create_encoder("conse-effnet-lite0", device="cpu")


@pytest.fixture
def fresh_classifier_cache():
    """A new ``ClassifierRegistry`` (no classifiers, warm-ups or stamps yet; ``registry.make_classifier``
    may be replaced by a fake builder); its background builds are stopped at teardown."""
    from retrieval.classify.registry import ClassifierRegistry

    registry = ClassifierRegistry()
    yield registry
    registry.stop_background_builds(timeout=10)
