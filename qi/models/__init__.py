"""Networks by name. Every model takes uint8 (or float 0..255) images and returns one logit.

A model that learns defect types (``defect_types``) has a head of ``1 + K`` outputs on the
same features: the first is still the defect logit every threshold and metric reads, the
other ``K`` are the logits of the types, meaningful for defective images only.

:class:`InspectionNet` is ``normalise -> encoder -> head``. The input normalisation the
encoder's weights were trained with lives inside the network, so a served model, a benchmark
and training all feed it the same uint8 tensors. ``finetune`` says which part learns:

- ``head``: the encoder is frozen (its features can be cached: :mod:`qi.data.embeddings`);
- ``last``: the last third of the encoder's stages and the head;
- ``all``: everything (a CNN from scratch always trains whole).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qi.choices import FINETUNE_MODES, TIMM_PREFIX
from qi.config import ModelConfig
from qi.models.cnn import ACTIVATIONS, InspectionCNN
from qi.models.encoders import BACKBONES, FeatureStage, backbone_of
from qi.models.parts import POOLINGS, build_head
from qi.models.weights import WeightsMismatchError, WeightsNotFoundError
from qi.views import dihedral_view


class InspectionNet(nn.Module):
    """Normalise uint8 images, encode them to a feature vector, return ``(N,)`` logits."""

    method = "classifier"  # a good-only detector says "anomaly" (qi.models.patchcore)

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
        self.defect_types: tuple[str, ...] = ()  # the type head's classes, in output order

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature vector of each image (what a frozen-encoder head sees)."""
        return self.encoder((images.float() - self.mean) / self.std)

    def all_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 1 + K)``: the defect logit, then the logits of the ``K`` defect types."""
        return self.head(self.embed(images))  # (N, D) features -> (N, 1 + K)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.all_logits(images)[:, 0]

    @property
    def feature_info(self) -> tuple[FeatureStage, ...]:
        """The encoder's intermediate stages: name, channels, stride."""
        return self.encoder.feature_info

    def stage_features(self, images: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """Feature maps of the encoder's stages ``indices`` (positions in ``feature_info``)
        for uint8 images, normalised as the encoder's weights expect."""
        return self.encoder.stage_features((images.float() - self.mean) / self.std, indices)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Defect probability per image, averaged over ``test_time_views`` flips/rotations."""
        return self.probabilities_and_types(images)[0]

    def probabilities_and_types(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(defect probability ``(N,)``, type probabilities ``(N, K)``), each averaged over
        ``test_time_views`` flips/rotations; ``K`` is 0 for a model without types."""
        views = [
            self.all_logits(dihedral_view(images, k)).float() for k in range(self.test_time_views)
        ]
        defect = torch.stack([torch.sigmoid(v[:, 0]) for v in views]).mean(0)
        types = torch.stack([torch.softmax(v[:, 1:], dim=1) for v in views]).mean(0)
        return defect, types

    def set_finetune(self, mode: str) -> None:
        """Freeze what ``mode`` keeps fixed (see the module docstring)."""
        if mode not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune '{mode}': choose one of {FINETUNE_MODES}")
        self.finetune = mode
        units = list(self.encoder.units)
        learning = {"head": 0, "last": max(1, len(units) // 3), "all": len(units)}[mode]
        for parameter in self.encoder.parameters():
            parameter.requires_grad = mode == "all"
        for unit in units[len(units) - learning :]:
            for parameter in unit.parameters():
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


def _encoder_of(name: str) -> Callable[[ModelConfig, int, int], nn.Module]:
    def build(config: ModelConfig, channels: int, image_size: int) -> nn.Module:
        return backbone_of(name).build(
            config.pretrained, channels, config.pooling, config.feature_stages
        )

    return build


def _architecture_of_backbone(name: str) -> Architecture:
    backbone = backbone_of(name)
    return Architecture(
        _encoder_of(name), backbone.mean, backbone.std, True, image_size=backbone.image_size
    )


# name -> architecture (keyed by qi.choices.MODELS); timm:<name> is built on demand
MODELS: dict[str, Architecture] = {
    "cnn": Architecture(_cnn, (127.5,) * 3, (63.75,) * 3, pretrained=False, image_size=None),
    **{name: _architecture_of_backbone(name) for name in BACKBONES},
}


def model_names() -> list[str]:
    return list(MODELS)


def architecture_of(name: str) -> Architecture:
    """The architecture named ``name`` (one of :data:`MODELS` or ``timm:<name>``); raises
    ValueError naming the choices."""
    if name.startswith(TIMM_PREFIX):
        return _architecture_of_backbone(name)
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model '{name}': choose one of {', '.join(MODELS)} or {TIMM_PREFIX}<name>"
        ) from None


def is_pretrained(config: ModelConfig) -> bool:
    """Whether ``config`` starts from pretrained weights (a backbone with weights)."""
    return config.name != "cnn" and config.pretrained not in (None, "", "none")


def has_frozen_encoder(config: ModelConfig) -> bool:
    """Whether ``config`` is a head on a frozen pretrained encoder: its features can be
    cached, its head may be any ``--head-kind``, members with the same encoder share it."""
    return is_pretrained(config) and config.finetune == "head"


def build_model(
    config: ModelConfig,
    channels: int,
    image_size: int | None = None,
    defect_types: tuple[str, ...] = (),
) -> InspectionNet:
    """The network for ``config`` and images of ``channels`` x ``image_size`` px; with
    ``defect_types``, its head also scores each of them.

    Raises ValueError naming the choices on an unknown name or on feature stages the
    network does not have, WeightsNotFoundError when
    pretrained weights are not on disk, WeightsMismatchError when a file does not fit.
    """
    architecture = architecture_of(config.name)
    if config.feature_stages and not architecture.pretrained:
        raise ValueError(
            f"--feature-stages needs a pretrained backbone (--model efficientnet_lite0, ...), "
            f"not {config.name}: drop it or choose a backbone"
        )
    size = image_size or architecture.image_size or 128
    if architecture.pretrained:
        # a backbone's head starts from the seed alone, not from how many random numbers the
        # library's constructor drew before its weights were replaced by the file's
        with torch.random.fork_rng(devices=[]):
            encoder = architecture.encoder(config, channels, size)
    else:
        encoder = architecture.encoder(config, channels, size)
    head = build_head(
        encoder.feature_dim,
        config.dropout,
        config.head_hidden,
        outputs=1 + len(defect_types),
        # a backbone's head on its frozen features; also when a saved whole network is loaded
        # (then without pretrained weights: the file has them)
        kind=config.head_kind if architecture.pretrained and config.finetune == "head" else "mlp",
    )
    mean, std = architecture.mean, architecture.std
    if channels == 1:  # a gray image is the sum-of-filters stem's average channel
        mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    net = InspectionNet(encoder, head, mean, std)
    net.set_finetune(config.finetune if is_pretrained(config) else "all")
    net.test_time_views = config.test_time_views
    net.pretrained = is_pretrained(config)
    net.defect_types = tuple(defect_types)
    return net


__all__ = [
    "ACTIVATIONS",
    "FINETUNE_MODES",
    "MODELS",
    "POOLINGS",
    "FeatureStage",
    "InspectionNet",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "architecture_of",
    "build_model",
    "has_frozen_encoder",
    "is_pretrained",
    "model_names",
]
