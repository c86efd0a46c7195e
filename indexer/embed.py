"""The indexer's embed stage (the mapper): decoded batches → vectors (and local features) per encoder.

Shared by both back-ends: the local run (``indexer.pipeline``) calls an ``Embedder`` in its main
thread, the Ray back-end (``indexer.distributed``) in each actor. ``transform_groups`` decides which
encoders share one decode + transform in the workers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from indexer.decode import assemble, split_transform

if TYPE_CHECKING:
    from indexer.runner import ReadBatch

LocalOut = tuple[np.ndarray, tuple[int, int]]     # an encoder's local tokens [n, p, C] and their grid


def embed(enc, x: torch.Tensor, local: str | None) -> tuple[np.ndarray, LocalOut | None]:
    """Global vectors, and with ``local`` (a layer: "final" or "fine") the local tokens + grid to store."""
    if enc.binary:
        return enc.hash_bits(x), None
    if local == "fine":
        vecs, _, _, tokens, grid = enc.encode_images_and_fine(x)
        return vecs, (tokens, grid)
    if local:
        vecs, tokens, grid = enc.encode_images_and_local(x)
        return vecs, (tokens, grid)
    return enc.encode_images(x), None


def transform_groups(encoders: dict) -> tuple[list, list, dict[str, int]]:
    """Worker transforms, their normalisation stats, and each encoder's group: encoders with the same
    preprocessing share one decode + transform."""
    transforms, stats, group_of, keys = [], [], {}, []
    for n, enc in encoders.items():
        head, norm = split_transform(enc.preprocess) if not enc.binary else (enc.preprocess, None)
        key = repr(head) + repr(None if norm is None else (norm[0].flatten().tolist(), norm[1].flatten().tolist()))
        if key in keys and "object at 0x" not in key:
            group_of[n] = keys.index(key)
        else:
            group_of[n] = len(transforms)
            keys.append(key)
            transforms.append(head)
            stats.append(norm)
    return transforms, stats, group_of


def gpu_decodable(name: str, enc, stats: list, group_of: dict[str, int]) -> bool:
    """Whether ``--decode gpu`` can stand in for this encoder's CPU preprocess: a ``[..., ToTensor,
    Normalize]`` transform (resize + crop + normalise, done on the GPU), or colour-names (the whole image in
    [0, 1]); not SSCD's or PDQ's uint8 HWC inputs."""
    return enc.spec.family == "colour" or (not enc.binary and stats[group_of[name]] is not None)


def decode_side(encoders: dict) -> int | None:
    """The shorter side the workers decode images to at least: the largest ``input_side`` of the encoders
    (``retrieval.images.load_image(min_side=...)``: a 12-megapixel JPEG is decoded at 1/2 or 1/4 scale by
    the JPEG decoder itself, as queries are); ``None`` (full decode) when an encoder does not say."""
    sides = [getattr(enc, "input_side", None) for enc in encoders.values()]
    if not sides or any(not isinstance(s, int) or s <= 0 for s in sides):
        return None
    return max(sides)


class Embedder:
    """The mapper: every encoder over a decoded batch, one pass each (global + local features together).

    ``local`` maps an encoder to the local layer it stores ("final" or "fine"); others store none.
    """

    def __init__(self, encoders: dict, local: dict[str, str]):
        self.encoders = encoders
        self.local = dict(local)
        self.transforms, self.stats, self.group_of = transform_groups(encoders)
        self.min_side = decode_side(encoders)

    def embed(self, batch: dict[str, Any], kept: list[int]) -> tuple[dict[str, np.ndarray], dict[str, LocalOut]]:
        """Vectors (and local features) of the ``kept`` records of a collated batch, in that order.

        ``batch`` holds the workers' tensors and, with ``--decode gpu``, ``decoded`` / ``fallback``
        (``indexer.gpu_batch.decode_raw``)."""
        decoded, fallback = batch.get("decoded", {}), batch.get("fallback", {})
        vectors, local = {}, {}
        for name, enc in self.encoders.items():
            x = assemble(batch, kept, decoded, fallback, self.group_of[name], self.stats, enc)
            vectors[name], loc = embed(enc, x, self.local.get(name))
            if loc is not None:
                local[name] = loc
        return vectors, local

    def __call__(self, batch: ReadBatch) -> tuple[dict[str, np.ndarray], dict[str, LocalOut]]:
        return self.embed(batch.data, batch.kept)
