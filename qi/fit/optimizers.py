"""Optimizers by name; the config's choices are :data:`qi.choices.OPTIMIZERS`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qi.config import TrainConfig


def _adamw(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)


def _adam(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=c.learning_rate, weight_decay=c.weight_decay)


def _sgd(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=c.learning_rate,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        nesterov=c.momentum > 0,
    )


# name -> builder (keyed by qi.choices.OPTIMIZERS)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}
