"""torchvision transfer backbones with one logit, adapted to 1 or 3 input channels.

Pretrained weights are read from disk only, never downloaded: either a file the user names,
or torchvision's own file name in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), where
``torchvision`` would have put it after an online download elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

# name -> (constructor, ImageNet weights enum)
BACKBONES: dict[str, tuple[Callable[..., nn.Module], tv.WeightsEnum]] = {
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1),
    "efficientnet_b0": (tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (tv.mobilenet_v3_large, tv.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk; the message says where to put them."""


def hub_checkpoint_path(name: str) -> Path:
    """Where torch's hub cache keeps the ImageNet weights of backbone ``name``."""
    url = BACKBONES[name][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights_file(name: str, pretrained: str) -> Path:
    """The local weights file for ``pretrained`` ("imagenet" or a path); never downloads."""
    if pretrained == "imagenet":
        path = hub_checkpoint_path(name)
        if not path.is_file():
            url = BACKBONES[name][1].url
            raise WeightsNotFoundError(
                f"ImageNet weights for {name} are not in torch's cache: copy "
                f"{os.path.basename(url)} "
                f"(from {url}) to {path}, or pass a weights file with --pretrained PATH"
            )
        return path
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} does not exist: give the path of a saved state dict "
            f"for {name}, or 'imagenet' to use torch's hub cache"
        )
    return path


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _first_conv(model: nn.Module) -> tuple[nn.Module, str]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return module, name
    raise ValueError("backbone has no convolution")


def _replace_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def adapt_input_channels(model: nn.Module, channels: int) -> None:
    """Swap the stem for ``channels`` inputs; grayscale keeps the sum of the RGB filters,
    which responds to a gray image as the RGB stem responds to the same image in colour."""
    conv, name = _first_conv(model)
    if conv.in_channels == channels:
        return
    new = nn.Conv2d(
        channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)
        new.weight.copy_(summed.repeat(1, channels, 1, 1) / channels if channels > 1 else summed)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    _replace_module(model, name, new)


def replace_classifier(model: nn.Module, dropout: float) -> None:
    """Turn the 1000-class head into a single defect logit."""
    if hasattr(model, "fc"):
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(model.fc.in_features, 1))
        return
    classifier = model.classifier
    last = classifier[-1]
    classifier[-1] = nn.Linear(last.in_features, 1)
    for module in classifier:
        if isinstance(module, nn.Dropout):
            module.p = dropout


def build_backbone(
    name: str, in_channels: int, dropout: float, pretrained: str | None
) -> nn.Module:
    constructor, _ = BACKBONES[name]
    model = constructor(weights=None)
    if pretrained:
        path = resolve_weights_file(name, pretrained)
        state = _load_state_dict(path)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path} does not fit {name}: {str(exc).splitlines()[0]}") from exc
    adapt_input_channels(model, in_channels)
    replace_classifier(model, dropout)
    return model
