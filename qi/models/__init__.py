"""Networks by name. Every model takes uint8 (or float 0..255) images and returns one logit.

:class:`InspectionNet` puts input normalisation inside the network, so a served model, a
benchmark and training all feed it the same uint8 tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from qi.config import ModelConfig
from qi.models.backbones import BACKBONES, WeightsNotFoundError, build_backbone
from qi.models.cnn import ACTIVATIONS, InspectionCNN

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InspectionNet(nn.Module):
    """Normalise uint8 images, run the backbone, return ``(N,)`` defect logits."""

    def __init__(self, body: nn.Module, channels: int, imagenet_stats: bool) -> None:
        super().__init__()
        if imagenet_stats:
            mean = torch.tensor(IMAGENET_MEAN if channels == 3 else [sum(IMAGENET_MEAN) / 3])
            std = torch.tensor(IMAGENET_STD if channels == 3 else [sum(IMAGENET_STD) / 3])
        else:
            mean, std = torch.full((channels,), 0.5), torch.full((channels,), 0.25)
        self.register_buffer("mean", mean.view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", std.view(1, -1, 1, 1) * 255.0)
        self.body = body

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std
        return self.body(x).reshape(-1)


def _cnn(config: ModelConfig, channels: int) -> nn.Module:
    return InspectionCNN(
        channels, config.depth, config.width, config.activation, config.dropout, config.batch_norm
    )


def _backbone(name: str) -> Callable[[ModelConfig, int], nn.Module]:
    def build(config: ModelConfig, channels: int) -> nn.Module:
        return build_backbone(name, channels, config.dropout, config.pretrained)

    return build


MODEL_BUILDERS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "cnn": _cnn,
    **{name: _backbone(name) for name in BACKBONES},
}


def model_names() -> list[str]:
    return list(MODEL_BUILDERS)


def build_model(config: ModelConfig, channels: int) -> InspectionNet:
    """The network for ``config``; raises ValueError naming the choices on an unknown name."""
    try:
        builder = MODEL_BUILDERS[config.name]
    except KeyError:
        raise ValueError(
            f"unknown model '{config.name}': choose one of {', '.join(MODEL_BUILDERS)}"
        ) from None
    body = builder(config, channels)
    return InspectionNet(body, channels, imagenet_stats=config.name != "cnn")


__all__ = ["ACTIVATIONS", "InspectionNet", "WeightsNotFoundError", "build_model", "model_names"]
