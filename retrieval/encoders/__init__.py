"""The encoder registry: configs as data (``registry.json``), thin adapters per family; where their
weights come from is :mod:`retrieval.encoders.weights` (``resolve_weights``, ``weights_available``).

>>> enc = create_encoder("effnet-lite0", device="cpu")
>>> vecs = enc.encode_images([img])          # [1, 1280] float32, unit rows
"""

from __future__ import annotations

import importlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retrieval.encoders.weights import resolve_weights, weights_available
from retrieval.errors import UnknownEncoderError

if TYPE_CHECKING:
    from retrieval.encoders.base import Encoder, EncoderSpec

__all__ = ["Encoder", "EncoderSpec", "create_encoder", "get_spec", "list_encoders", "register_encoder",
           "resolve_weights", "weights_available", "DEFAULT_ENCODER"]

DEFAULT_ENCODER = "clip-vit-b-32"
_TABLE = Path(__file__).with_name("registry.json")
_FAMILIES = {  # family -> "module:Class"
    "clip": "clip:ClipEncoder",
    "dinov2": "dinov2:Dinov2Encoder",
    "effnet": "effnet:EffnetEncoder",
    "conse": "conse:ConseEncoder",
    "sscd": "sscd:SscdEncoder",
    "pdq": "pdq:PdqEncoder",
    "colour": "colour:ColourNamesEncoder",
}
_SPECS: dict[str, EncoderSpec] = {}
_CACHE: dict[tuple[str, str, str], Encoder] = {}
log = logging.getLogger("loupe.encoders")


def __getattr__(name: str) -> Any:
    """``Encoder`` and ``EncoderSpec``, imported on first use: this package (the registry table, the weights
    check of ``loupe index``) loads without torch."""
    if name in ("Encoder", "EncoderSpec"):
        from retrieval.encoders import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _load_table() -> None:
    from retrieval.encoders.base import EncoderSpec

    if _SPECS:
        return
    rows = json.loads(_TABLE.read_text())
    for name, row in rows.items():
        if not name.startswith("_"):
            _SPECS[name] = EncoderSpec.from_row(name, row)


def register_encoder(name: str, row: dict[str, Any] | EncoderSpec, *, replace: bool = False) -> EncoderSpec:
    """Add an encoder (e.g. a tiny test model, or a fine-tuned checkpoint) to the registry."""
    from retrieval.encoders.base import EncoderSpec

    _load_table()
    spec = row if isinstance(row, EncoderSpec) else EncoderSpec.from_row(name, row)
    if spec.family not in _FAMILIES:
        raise UnknownEncoderError(f"unknown encoder family {spec.family!r}; known: {', '.join(sorted(_FAMILIES))}")
    if name in _SPECS and not replace:
        raise ValueError(f"encoder {name!r} is already registered")
    _SPECS[name] = spec
    for key in [k for k in _CACHE if k[0] == name]:
        del _CACHE[key]
    return spec


def get_spec(name: str) -> EncoderSpec:
    _load_table()
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownEncoderError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(_SPECS))} (see `loupe encoders`)"
        ) from None


def list_encoders() -> list[dict[str, Any]]:
    """One description per registered encoder: name, dim, modalities, weights, offline."""
    _load_table()
    return [spec.describe() for spec in _SPECS.values()]


def create_encoder(name: str, device: str = "auto", precision: str = "auto", *, cache: bool = True) -> Encoder:
    """Build (or reuse) the encoder ``name`` on ``device`` (``auto|cpu|cuda[:n]``)."""
    from retrieval.device import resolve_device

    spec = get_spec(name)
    dev = resolve_device(device, precision)
    key = (name, str(dev.device), dev.precision)
    if cache and key in _CACHE:
        return _CACHE[key]
    module_name, cls_name = _FAMILIES[spec.family].split(":")
    log.info("loading encoder %s on %s ...", name, dev.device)   # weights load here: seconds to minutes
    t0 = time.perf_counter()
    module = importlib.import_module(f"{__name__}.{module_name}")
    encoder = getattr(module, cls_name)(spec, dev)
    log.info("loaded encoder %s in %.1f s", name, time.perf_counter() - t0)
    if cache:
        _CACHE[key] = encoder
    return encoder
