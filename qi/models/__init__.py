"""Networks by name. Every model takes uint8 (or float 0..255) images and returns one logit.

:class:`InspectionNet` is ``normalise -> encoder -> head``. The input normalisation the
encoder's weights were trained with lives inside the network, so a served model, a benchmark
and training all feed it the same uint8 tensors. ``finetune`` says which part learns:

- ``head``: the encoder is frozen (its features can be cached: :mod:`qi.data.embeddings`);
- ``last``: the last third of the encoder's stages and the head;
- ``all``: everything (a CNN from scratch always trains whole).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from qi.config import ModelConfig
from qi.data.augmentation import dihedral_view
from qi.models.backbones import BACKBONES, WeightsNotFoundError
from qi.models.cnn import ACTIVATIONS, InspectionCNN
from qi.models.parts import POOLINGS, build_head

FINETUNE_MODES = ("head", "last", "all")


class InspectionNet(nn.Module):
    """Normalise uint8 images, encode them to a feature vector, return ``(N,)`` logits."""

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.encoder = encoder
        self.head = head
        self.finetune = "all"
        self.test_time_views = 1
        self.pretrained = False  # the encoder starts from pretrained weights

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature vector of each image (what a frozen-encoder head sees)."""
        return self.encoder((images.float() - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images)).reshape(-1)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Defect probability per image, averaged over ``test_time_views`` flips/rotations."""
        views = [dihedral_view(images, k) for k in range(self.test_time_views)]
        return torch.stack([torch.sigmoid(self(v).float()) for v in views]).mean(0)

    def set_finetune(self, mode: str) -> None:
        """Freeze what ``mode`` keeps fixed (see the module docstring)."""
        if mode not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune '{mode}': choose one of {FINETUNE_MODES}")
        self.finetune = mode
        stages = list(self.encoder.stages)
        learning = {"head": 0, "last": max(1, len(stages) // 3), "all": len(stages)}[mode]
        for parameter in self.encoder.parameters():
            parameter.requires_grad = mode == "all"
        for stage in stages[len(stages) - learning :]:
            for parameter in stage.parameters():
                parameter.requires_grad = True
        self.train(self.training)

    def frozen_modules(self) -> list[nn.Module]:
        """Encoder modules with no parameter that learns (their batch-norm statistics stay)."""
        frozen = []
        for module in self.encoder.modules():
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                frozen.append(module)
        return frozen

    def train(self, mode: bool = True) -> InspectionNet:
        """As ``nn.Module.train``, but frozen layers stay in eval mode: their batch-norm
        statistics are the pretrained ones and stochastic depth stays off."""
        super().train(mode)
        if mode and self.finetune != "all":
            for module in self.frozen_modules():
                module.eval()
        return self


@dataclass(frozen=True)
class Architecture:
    """How to build one named network, and what its weights expect."""

    encoder: Callable[[ModelConfig, int, int], nn.Module]  # (config, channels, image size)
    mean: tuple[float, float, float]  # input normalisation, 0..255 units, RGB
    std: tuple[float, float, float]
    pretrained: bool  # ImageNet weights exist: finetune modes and feature caching apply
    image_size: int | None  # resolution of the pretrained weights


def _cnn(config: ModelConfig, channels: int, image_size: int) -> nn.Module:
    return InspectionCNN(
        channels, config.depth, config.width, config.activation, config.batch_norm, config.pooling
    )


def _backbone(name: str) -> Callable[[ModelConfig, int, int], nn.Module]:
    def build(config: ModelConfig, channels: int, image_size: int) -> nn.Module:
        weights = None if config.pretrained in (None, "", "none") else config.pretrained
        return BACKBONES[name].build(weights, channels, image_size, config.pooling)

    return build


# name -> architecture; the config's --model choices come from here
MODELS: dict[str, Architecture] = {
    "cnn": Architecture(_cnn, (127.5,) * 3, (63.75,) * 3, pretrained=False, image_size=None),
    **{
        name: Architecture(_backbone(name), b.mean, b.std, pretrained=True, image_size=b.image_size)
        for name, b in BACKBONES.items()
    },
}


def model_names() -> list[str]:
    return list(MODELS)


def is_pretrained(config: ModelConfig) -> bool:
    """Whether ``config`` starts from pretrained weights (a backbone with weights)."""
    return MODELS[config.name].pretrained and config.pretrained not in (None, "", "none")


def build_model(config: ModelConfig, channels: int, image_size: int | None = None) -> InspectionNet:
    """The network for ``config`` and images of ``channels`` x ``image_size`` px.

    Raises ValueError naming the choices on an unknown name, WeightsNotFoundError when
    pretrained weights are not on disk.
    """
    try:
        architecture = MODELS[config.name]
    except KeyError:
        raise ValueError(
            f"unknown model '{config.name}': choose one of {', '.join(MODELS)}"
        ) from None
    size = image_size or architecture.image_size or 128
    encoder = architecture.encoder(config, channels, size)
    head = build_head(encoder.feature_dim, config.dropout, config.head_hidden)
    mean, std = architecture.mean, architecture.std
    if channels == 1:  # a gray image is the sum-of-filters stem's average channel
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    net = InspectionNet(encoder, head, mean, std)
    net.set_finetune(config.finetune if is_pretrained(config) else "all")
    net.test_time_views = config.test_time_views
    net.pretrained = is_pretrained(config)
    return net


__all__ = [
    "ACTIVATIONS",
    "FINETUNE_MODES",
    "MODELS",
    "POOLINGS",
    "InspectionNet",
    "WeightsNotFoundError",
    "build_model",
    "is_pretrained",
    "model_names",
]
