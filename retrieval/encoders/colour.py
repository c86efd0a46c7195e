"""``colour-names``: an image's colour distribution over the eleven basic colour terms (:mod:`retrieval.colour.naming`).

An 11-d vector per image (``sqrt`` of the distribution, unit length: inner products are Bhattacharyya
coefficients), computed from a 64×64 thumbnail of the whole image with no model weights (the naming
table comes from the XKCD colour survey shipped with Loupe). It answers colour phrases ("red", "navy
blue") as queries — ``encode_texts`` — and gives instruction queries ("the same, but red") the colour
sense the offline text–image encoder lacks. Index it beside a text encoder:
``loupe index DIR --encoder conse-effnet-lite0 --encoder effnet-lite0 --encoder colour-names``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from retrieval.colour import naming as colour
from retrieval.encoders.base import Encoder, SquareResize
from retrieval.types import Vectors


class ColourNamesEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        # a uint8 CHW thumbnail of the whole image (no crop: the colour of the edges counts as background)
        self.preprocess = SquareResize(spec.image_size, "box", channels_first=True)

    def distributions(self, batch: torch.Tensor | Sequence) -> np.ndarray:
        """``[n, 11]`` colour distributions (rows sum to 1, in :data:`retrieval.colour.naming.BASIC_TERMS` order)."""
        return colour.colour_names(self.to_batch(batch))

    def encode_images(self, batch: torch.Tensor | Sequence) -> Vectors:
        return colour.colour_vectors(self.distributions(batch))

    def encode_texts(self, texts: Sequence[str]) -> Vectors:
        """Colour phrases → unit vectors; a phrase that names no colour is an ``InvalidQueryError``."""
        return colour.phrase_vectors(list(texts))
