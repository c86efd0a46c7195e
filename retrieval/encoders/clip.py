"""CLIP dual encoders through open_clip (ViT-B-32, ViT-L-14, or any open_clip architecture).

Preprocessing is open_clip's own validation transform, so vectors equal open_clip's
``encode_image`` / ``encode_text`` on the same weights (tests check this to 1e-5). Local features
are the ViT patch tokens after ``ln_post``, projected into the joint space by ``visual.proj``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from retrieval.encoders.base import Encoder
from retrieval.encoders.weights import resolve_weights
from retrieval.numeric import l2_normalize
from retrieval.types import Vectors


def _register_arch(arch: str, model_config: dict[str, Any]) -> None:
    import open_clip

    folder = Path(tempfile.mkdtemp(prefix="loupe-openclip-"))
    (folder / f"{arch}.json").write_text(json.dumps(model_config))
    open_clip.add_model_config(folder)


class ClipEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        import open_clip

        arch = spec.get("arch")
        if spec.get("model_config"):
            _register_arch(arch, spec.get("model_config"))
        weights = None if spec.get("random_init") else resolve_weights(spec)
        try:  # a file, or open_clip's pretrained tag (its hub cache, then the hub)
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=weights.location if weights else None)
        except Exception as exc:  # hub unreachable, missing file, bad checkpoint
            if weights is None:
                raise
            raise weights.error(exc) from exc
        self.model = model.eval().to(device.device)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.logit_scale = float(self.model.logit_scale.exp().item()) if hasattr(self.model, "logit_scale") else 100.0

    @property
    def visual(self):
        return self.model.visual

    @property
    def grid(self) -> tuple[int, int]:
        g = self.visual.grid_size
        return (int(g[0]), int(g[1]))

    @torch.inference_mode()
    def encode_images(self, batch) -> Vectors:
        """open_clip's own ``encode_image`` (the pooled, projected CLS token), normalised."""
        with self.lock:
            x = self.to_batch(batch)
            with self.device.autocast():
                out = self.model.encode_image(x)
        return l2_normalize(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> Vectors:
        with self.lock:
            tokens = self.tokenizer(list(texts)).to(self.device.device)
            with self.device.autocast():
                out = self.model.encode_text(tokens)
        return l2_normalize(out)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled, patch tokens projected by visual.proj)`` of a preprocessed batch on the device."""
        visual = self.visual
        previous = visual.output_tokens
        visual.output_tokens = True
        try:
            pooled, tokens = visual(x)
        finally:
            visual.output_tokens = previous
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return pooled, tokens

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        x = self.to_batch(batch)
        with self.device.autocast():
            pooled, tokens = self._tokens(x)
        return pooled, tokens, self.grid
