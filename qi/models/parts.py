"""The parts every network shares: global pooling, the classification head, stem adaptation.

A qi network is ``normalise -> encoder -> head``: the encoder turns an image into one feature
vector (a CNN or a pretrained backbone, then :class:`GlobalPool`), the head turns the vector
into one defect logit. Keeping the two apart lets a study train heads on cached features of a
frozen encoder in seconds (:mod:`qi.data.embeddings`) and serve the same network whole.
"""

from __future__ import annotations

import torch
from torch import nn

from qi.choices import POOLINGS


class GlobalPool(nn.Module):
    """Feature map (N, C, H, W) -> vector. ``max`` keeps a small defect's response (a pin hole
    on a casting), ``avg`` describes a texture, ``avgmax`` (both, 2C values) does not choose."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind not in POOLINGS:
            raise ValueError(f"unknown pooling '{kind}': choose one of {', '.join(POOLINGS)}")
        self.kind = kind

    @property
    def multiplier(self) -> int:
        return 2 if self.kind == "avgmax" else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "avg":
            return x.mean((2, 3))
        if self.kind == "max":
            return x.amax((2, 3))
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], dim=1)


class Standardize(nn.Module):
    """Fixed per-feature centring and scaling, set from the training features of a frozen
    encoder before its head is fitted (identity otherwise). Part of the model, so the served
    network repeats it exactly."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def set_from(self, features: torch.Tensor) -> None:
        self.mean.copy_(features.float().mean(0))
        self.scale.copy_(features.float().std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


def build_head(dim: int, dropout: float, hidden: int = 0, outputs: int = 1) -> nn.Sequential:
    """Feature vector -> ``outputs`` logits (the defect's, then the types'): a linear
    classifier, or one hidden layer of ``hidden``, shared by all outputs."""
    layers: list[nn.Module] = [Standardize(dim), nn.Dropout(dropout)]
    if hidden > 0:
        layers += [nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout)]
        dim = hidden
    layers.append(nn.Linear(dim, outputs))
    return nn.Sequential(*layers)


class HeadOnViews(nn.Module):
    """A head applied to features of several views of each image, ``(N, V, D)`` -> ``(N,)``
    logits of the view-averaged probability: what the whole network answers with
    test-time averaging, computed from cached features."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def all_logits(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, 1 + K)``: the defect logit and the type logits of the view-averaged
        probabilities (log-probabilities for the types: their softmax is the average)."""
        n, views, dim = features.shape
        logits = self.head(features.reshape(n * views, dim)).reshape(n, views, -1)
        if views == 1:
            return logits[:, 0]
        defect = torch.logit(torch.sigmoid(logits[..., 0].float()).mean(1), eps=1e-6)
        types = torch.log(torch.softmax(logits[..., 1:].float(), dim=2).mean(1).clamp_min(1e-12))
        return torch.cat([defect[:, None], types], dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.all_logits(features)[:, 0]
