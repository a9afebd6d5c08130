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


class KernelHead(nn.Module):
    """An RBF support-vector machine as torch layers (what an ``svm`` head's scikit-learn
    estimator is copied into): the decision value ``sum_i dual_i exp(-gamma |x - s_i|^2) +
    intercept`` over the support vectors ``s_i``, turned into the defect logit by its Platt
    calibration ``-(a f + b)``; the type logits from a linear layer on the same (standardised)
    features. Being torch, it is served, differentiated (Grad-CAM) and exported to ONNX as any
    head, and loaded from tensors, never unpickled. The number of support vectors is known
    only after fitting, so loading sizes the buffers from the saved state."""

    def __init__(self, dim: int, types: int = 0) -> None:
        super().__init__()
        self.register_buffer("support", torch.zeros(0, dim))
        self.register_buffer("dual", torch.zeros(0))
        self.register_buffer("calibration", torch.zeros(4))  # gamma, intercept, a, b
        self.types = nn.Linear(dim, types) if types else None

    def set_from(self, support, dual, gamma: float, intercept: float, a: float, b: float):
        self.support = torch.as_tensor(support, dtype=torch.float32).clone()
        self.dual = torch.as_tensor(dual, dtype=torch.float32).reshape(-1).clone()
        self.calibration = torch.tensor([gamma, intercept, a, b], dtype=torch.float32)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("support", "dual"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma, intercept, a, b = (self.calibration[i] for i in range(4))
        x = x.float()
        squared = (
            (x * x).sum(1, keepdim=True)
            - 2 * x @ self.support.T
            + (self.support * self.support).sum(1)[None]
        ).clamp_min(0)
        decision = torch.exp(-gamma * squared) @ self.dual + intercept
        logit = -(a * decision + b)
        if self.types is None:
            return logit[:, None]
        return torch.cat([logit[:, None], self.types(x)], dim=1)


def build_head(
    dim: int, dropout: float, hidden: int = 0, outputs: int = 1, kind: str = "mlp"
) -> nn.Sequential:
    """Feature vector -> ``outputs`` logits (the defect's, then the types'): a linear
    classifier, or one hidden layer of ``hidden``, shared by all outputs (``kind`` mlp);
    a linear layer a logistic regression is copied into (``logistic``: ``hidden`` does not
    apply); a :class:`KernelHead` (``svm``)."""
    if kind == "svm":
        return nn.Sequential(Standardize(dim), KernelHead(dim, outputs - 1))
    if kind == "logistic":
        hidden = 0
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
