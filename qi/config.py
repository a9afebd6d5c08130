"""Typed settings for every stage of qi. Defaults live here and nowhere else.

The CLI, the MLproject entry points and the tests all build these dataclasses; library code
takes them as arguments instead of reading options or environment variables itself.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

ColorMode = Literal["gray", "rgb"]
BadImagePolicy = Literal["skip", "strict"]

DEFAULT_MODEL_NAME = "quality-inspector"
DEFAULT_EXPERIMENT = "qi"


def cache_dir() -> Path:
    """Where qi keeps generated data and decoded image arrays (``QI_CACHE_DIR`` overrides)."""
    configured = os.environ.get("QI_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qi"


@dataclass(frozen=True)
class SynthConfig:
    """The embedded casting data set; sized to train to >95% accuracy in minutes on 2 cores."""

    n_train: int = 1300
    n_test: int = 300
    image_size: int = 128
    defect_fraction: float = 0.57  # the Kaggle casting set has 57% defective images
    subtle_fraction: float = 0.25  # share of defects drawn small and low-contrast
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they become tensors."""

    data_dir: Path | None = None  # None: the embedded synthetic casting set
    ok_class: str | None = None  # None: detected from common names (good, ok, ok_front, ...)
    image_size: int = 128
    color_mode: ColorMode = "gray"
    clahe: bool = False  # contrast-limited histogram equalisation before resizing
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    max_images: int | None = None  # stratified subsample for quick runs
    augment_strength: float = 0.5  # 0 disables augmentation, 1 is strong
    batch_size: int = 32
    num_workers: int = 0  # decoded images live in memory; workers rarely pay off on CPU
    bad_images: BadImagePolicy = "skip"
    seed: int = 42

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "gray" else 3


@dataclass(frozen=True)
class ModelConfig:
    """Which network; CNN fields apply to ``name='cnn'``, ``pretrained`` to backbones."""

    name: str = "cnn"
    depth: int = 5
    width: int = 16
    activation: str = "relu"
    dropout: float = 0.2
    batch_norm: bool = True
    pretrained: str | None = None  # None, "imagenet" (torch hub cache) or a weights file path


@dataclass(frozen=True)
class TrainConfig:
    """How one configuration is fitted."""

    epochs: int = 15
    optimizer: str = "adamw"
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9  # SGD only
    early_stopping_patience: int = 5
    early_stopping_after: int = 0  # epochs before early stopping may act (studies: half)
    monitor: str = "val/loss"  # early stopping and best checkpoint
    accelerator: str = "auto"
    precision: str | None = None  # None: bf16 where the GPU/CPU has it, else 16 (GPU) or 32
    deterministic: bool = False
    limit_batches: float | int | None = None  # tests shrink epochs with this
    max_seconds: float | None = None  # wall-clock cap of one fit (a study's deadline)
    seed: int = 42


PROMOTION_METRICS = ("f1", "acc", "auroc", "average_precision", "defect_recall", "macro_f1")


@dataclass(frozen=True)
class EvaluationConfig:
    """The operating point and how a new model is compared with the champion."""

    target_recall: float = 0.99  # threshold chosen on validation to catch this share of defects
    promotion_metric: str = "f1"  # test metric a new version must beat: f1, acc, auroc, ...
    register: bool = True  # tune registers its best model
    force_promote: bool = False


@dataclass(frozen=True)
class TrackingConfig:
    """Where runs go. ``tracking_uri=None`` keeps MLFLOW_TRACKING_URI or a local sqlite store."""

    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    log_model: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, grouped as the stages see it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)


@dataclass(frozen=True)
class SearchSpace:
    """What a study may vary. Ranges are (low, high); tuples of names or sizes are choices.

    Ranges hold `qi train`'s defaults and leave out what did not learn in a short budget: in
    our studies on the embedded data, every trial with depth 3, an Adam learning rate near 3e-4,
    SGD below 1e-2 or Adam's L2 weight decay above 2e-3 ended near "everything is defective"
    (validation F1 <= 0.76). A default study has room for a handful of trials, not for those.
    """

    learning_rate: tuple[float, float] = (5e-4, 8e-3)  # Adam and AdamW, log scale
    sgd_learning_rate: tuple[float, float] = (1e-2, 2e-1)  # SGD with momentum needs ~20x more
    optimizers: tuple[str, ...] = ("adamw", "adam", "sgd")
    weight_decay: tuple[float, float] = (1e-6, 1e-3)  # log scale
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    dropout: tuple[float, float] = (0.0, 0.5)
    activations: tuple[str, ...] = ("relu", "gelu", "silu")
    models: tuple[str, ...] = ("cnn",)
    depth: tuple[int, int] = (4, 5)  # cnn only
    widths: tuple[int, ...] = (8, 16, 24)  # cnn only
    augment_strength: tuple[float, float] = (0.0, 1.0)
    image_sizes: tuple[int, ...] = (96, 128)  # 64 px blurs pin holes away


@dataclass(frozen=True)
class TuneConfig:
    """The Optuna study around :class:`RunConfig`: budget, objective, sampler, pruner, storage."""

    study_name: str = "qi"
    storage: str | None = None  # None: a journal file next to the tracking store
    n_trials: int = 20  # finished (complete or pruned) trials the study should have
    timeout: float | None = 480.0  # seconds for this worker; running trials stop at the deadline
    epochs: int = 30  # per trial: twice `qi train`'s 15, which stops while still improving
    metric: str = "val/f1"  # F1 of the defective class; ties go to the lower val/loss
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 42
    start_with_defaults: bool = True  # trial 0 is `qi train`'s configuration
    model_name: str = DEFAULT_MODEL_NAME  # registry name of the best model
    enqueue: tuple[dict, ...] = ()  # configurations to evaluate first (dotted param names)
    space: SearchSpace = field(default_factory=SearchSpace)


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``section.field`` dict of a (nested) dataclass, as MLflow params want it."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if hasattr(value, "__dataclass_fields__"):
            flat.update(flatten(value, prefix=f"{key}."))
        else:
            flat[key] = str(value) if isinstance(value, Path) else value
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly nested dict of a dataclass (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(asdict(config) if is_dataclass(config) else config)


__all__ = [
    "BadImagePolicy",
    "ColorMode",
    "DataConfig",
    "EvaluationConfig",
    "ModelConfig",
    "RunConfig",
    "SearchSpace",
    "SynthConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "cache_dir",
    "flatten",
    "replace",
    "to_dict",
]
