"""A compact CNN sized for 2-core CPUs: conv blocks that halve the resolution, then pooling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qi.models.encoders import FeatureStage
from qi.models.parts import GlobalPool

# name -> activation (keyed by qi.choices.ACTIVATIONS)
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation '{name}': choose one of {', '.join(ACTIVATIONS)}"
        ) from None


def conv_block(c_in: int, c_out: int, act: str, batch_norm: bool) -> nn.Sequential:
    """3x3 convolution, optional batch norm, activation, 2x2 max pooling. One convolution
    per block keeps a 2-core CPU at hundreds of images per second; depth adds the context."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    layers += [activation(act), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class InspectionCNN(nn.Module):
    """Encoder: ``depth`` blocks, channels ``width * 2**i`` (capped at 256), global pooling.

    Max pooling keeps a small defect's response (a pin hole on a casting); average pooling
    describes a texture; ``avgmax`` offers both to the head.
    """

    def __init__(
        self,
        in_channels: int,
        depth: int = 4,
        width: int = 32,
        act: str = "relu",
        batch_norm: bool = True,
        pool: str = "max",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"CNN depth must be at least 1, got {depth}")
        if width < 1:
            raise ValueError(f"CNN width must be at least 1, got {width}")
        channels = [in_channels] + [min(width * 2**i, 256) for i in range(depth)]
        self.features = nn.Sequential(
            *(
                conv_block(a, b, act, batch_norm)
                for a, b in zip(channels, channels[1:], strict=False)
            )
        )
        self.pool = GlobalPool(pool)
        self.feature_dim = channels[-1] * self.pool.multiplier
        self.units = list(self.features)
        self.feature_info = tuple(
            FeatureStage(f"features.{i}", c, 2 ** (i + 1)) for i, c in enumerate(channels[1:])
        )

    @property
    def cam_layer(self) -> nn.Module:
        """The last block's activation, before its max pooling: the finest map of the last
        block (8x8 for 128 px at depth 5) for Grad-CAM."""
        return self.features[-1][-2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))

    def stage_features(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The outputs of blocks ``indices`` (positions in ``feature_info``)."""
        indices = [i % len(self.features) for i in indices]
        wanted, maps = set(indices), {}
        for i, block in enumerate(self.features[: max(wanted) + 1]):
            x = block(x)
            if i in wanted:
                maps[i] = x
        return [maps[i] for i in indices]
