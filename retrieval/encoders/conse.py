"""ConSE: text + image in one space with no network (Norouzi et al., ICLR 2014).

An image is embedded as the convex combination of the text embeddings of the classifier's top-T
classes, weighted by their probabilities (renormalised over the top T); a text is embedded by the
same text model. Here: EfficientNet-Lite0 ImageNet-1k probabilities, ImageNet class names (open_clip's
``IMAGENET_CLASSNAMES``) averaged over prompt templates, MiniLM-L6 sentence embeddings (384-d).
T and the templates are set in the registry row (``top_t``, ``templates``).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Sequence

import numpy as np
import torch

from retrieval import settings
from retrieval.encoders.base import Encoder
from retrieval.encoders.effnet import CHANNELS_LAST, effnet_transform, load_effnet_lite0
from retrieval.encoders.minilm import MiniLMTextEncoder
from retrieval.numeric import l2_normalize
from retrieval.types import Vectors


def imagenet_classnames() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def class_prompt_embeddings(text: MiniLMTextEncoder, classnames: Sequence[str], templates: Sequence[str]) -> Vectors:
    """[n_classes, 384]: the normalised mean of each class's template embeddings (cached on disk)."""
    key = hashlib.sha1(json.dumps([list(classnames), list(templates), "minilm-l6-v2"]).encode()).hexdigest()[:16]
    path = settings.cache_dir() / f"conse-classes-{key}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(classnames), text.dim):
                return cached.astype(np.float32)
        except (OSError, ValueError):
            pass
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = text.encode(prompts).reshape(len(classnames), len(templates), -1).mean(axis=1)
    emb = l2_normalize(emb)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, path)
    except OSError:
        pass
    return emb


def conse_combine(probs: np.ndarray, class_emb: np.ndarray, top_t: int) -> Vectors:
    """ConSE image vectors: sum_t p(y_t|x) s(y_t) / sum_t p(y_t|x) over the top-T classes, normalised."""
    probs = np.asarray(probs, dtype=np.float32)
    t = max(1, min(int(top_t), probs.shape[1]))
    top = np.argpartition(-probs, t - 1, axis=1)[:, :t]
    weights = np.take_along_axis(probs, top, axis=1)
    weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    vecs = np.einsum("nt,ntd->nd", weights, class_emb[top])
    return l2_normalize(vecs)


class ConseEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        self.image_model = load_effnet_lite0(spec).to(device.device)
        self.preprocess = effnet_transform(spec)
        self.text = MiniLMTextEncoder.shared(device)
        self.top_t = int(spec.get("top_t", 10))
        self.classnames = imagenet_classnames()
        self.templates = list(spec.get("templates") or ["a photo of a {}."])
        self.class_embeddings = class_prompt_embeddings(self.text, self.classnames, self.templates)

    def to_batch(self, batch) -> torch.Tensor:
        return super().to_batch(batch).contiguous(memory_format=CHANNELS_LAST)   # as the effnet encoder

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(ImageNet-1k logits [n, 1000], final feature-map cells [n, h*w, 1280], (h, w))``: the first
        is not a vector to normalise, so ``encode_images*`` are ConSE's own."""
        x = self.to_batch(batch)
        with self.device.autocast():
            fmap = self.image_model.forward_features(x)
            logits = self.image_model.forward_head(fmap)
        return logits, fmap.flatten(2).transpose(1, 2), (int(fmap.shape[2]), int(fmap.shape[3]))

    @torch.inference_mode()
    def class_probabilities(self, batch) -> np.ndarray:
        with self.lock:
            logits, _, _ = self._forward(batch)
        return logits.float().softmax(dim=-1).cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, batch) -> Vectors:
        return conse_combine(self.class_probabilities(batch), self.class_embeddings, self.top_t)

    def encode_texts(self, texts: Sequence[str]) -> Vectors:
        return self.text.encode(texts)

    @torch.inference_mode()
    def encode_images_and_local(self, batch) -> tuple[Vectors, Vectors, tuple[int, int]]:
        with self.lock:
            logits, tokens, grid = self._forward(batch)
        probs = logits.float().softmax(dim=-1).cpu().numpy()
        return conse_combine(probs, self.class_embeddings, self.top_t), l2_normalize(tokens), grid
