"""The search space and its mapping to configs: what a trial samples and what it sets.

Optuna parameter names are the config's own dotted names (``train.learning_rate``,
``model.width``...), so a trial's params, its MLflow params and the best configuration all read
the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import optuna

from qi import choices
from qi.config import (
    RunConfig,
    SearchSpace,
    TuneConfig,
    feature_stage_list,
    head_c_of,
    stride_list,
)
from qi.storage import redacted


def load_search_space(path: Path | None, base: SearchSpace | None = None) -> SearchSpace:
    """Defaults overridden by a JSON file with any of :class:`SearchSpace`'s fields."""
    base = base if base is not None else SearchSpace()
    if path is None:
        return base
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"search space file {path}: {exc}") from exc
    known = {f.name for f in fields(SearchSpace)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(
            f"search space file {path}: unknown keys {sorted(unknown)}; known: {sorted(known)}"
        )
    try:  # SearchSpace checks its own values (choices, ranges)
        return replace(base, **{k: tuple(v) for k, v in raw.items()})
    except ValueError as exc:
        raise ValueError(f"search space file {path}: {exc}") from exc


def resolve_study(base: RunConfig, tune: TuneConfig) -> tuple[RunConfig, TuneConfig]:
    """The configs a study runs with: the space from ``tune.search_space`` (a JSON file) over
    ``tune.space``, then ``tune.models`` and ``tune.image_size`` over that; a fixed image size
    is also the base configuration's. Raises ValueError on a bad file or value."""
    space = load_search_space(tune.search_space, tune.space)
    if tune.models:
        space = replace(space, models=tune.models)
    if tune.image_size:
        fixed = (tune.image_size,)  # every trial's: the CNN's and a pretrained backbone's
        space = replace(space, image_sizes=fixed, backbone_image_sizes=fixed)
        base = replace(base, data=replace(base.data, image_size=tune.image_size))
    return base, replace(tune, space=space)


def _cnn(params: dict) -> bool:
    return params["model.name"] == "cnn"


def _backbone(params: dict) -> bool:
    return params["model.name"] != "cnn"


def _frozen(params: dict) -> bool:
    return _backbone(params) and params["model.finetune"] == "head"


def _trains_on_images(params: dict) -> bool:
    return not _frozen(params)


def _estimated(params: dict) -> bool:
    """A head scikit-learn fits (no optimiser, batches or dropout)."""
    return _frozen(params) and params["model.head_kind"] != "mlp"


def _by_gradient(params: dict) -> bool:
    return not _estimated(params)


def _backbone_by_gradient(params: dict) -> bool:
    return _backbone(params) and _by_gradient(params)


def _logistic(params: dict) -> bool:
    return _frozen(params) and params["model.head_kind"] == "logistic"


def _svm(params: dict) -> bool:
    return _frozen(params) and params["model.head_kind"] == "svm"


def _fine_tuned(params: dict) -> bool:
    return _backbone(params) and params["model.finetune"] != "head"


def _always(params: dict) -> bool:
    return True


def _same(value: Any) -> Any:
    return value


def _c_or_default(kind: str) -> Callable[[Any], float]:
    """A config's C as a trial's value: ``--head-c``, or the kind's default."""
    return lambda c: head_c_of(kind, c)


def _stride_text(strides: tuple[int, ...]) -> str:
    return ",".join(str(s) for s in strides)


def _feature_stage_text(strides: tuple[int, ...]) -> str:
    return _stride_text(strides) or "none"


@dataclass(frozen=True)
class SearchParam:
    """One dimension of the search: its Optuna name, the config field it sets, the
    :class:`~qi.config.SearchSpace` field holding its domain, how it is sampled, and when it
    applies (CNN-only, backbone-only... judged on the parameters sampled before it)."""

    name: str  # Optuna's name (a trial's params and MLflow params read the same)
    target: str  # dotted config field it sets
    domain: str  # SearchSpace field: (low, high) or choices
    kind: str  # "choice", "int", "float" or "log"
    when: Callable[[dict], bool] = _always
    to_config: Callable[[Any], Any] = _same  # Optuna's plain value -> the field's value
    from_config: Callable[[Any], Any] = _same  # and back (a trial to enqueue)


# in sampling order: conditions may read what is sampled before them
SEARCH = (
    SearchParam("model.name", "model.name", "models", "choice"),
    SearchParam("model.finetune", "model.finetune", "finetune", "choice", _backbone),
    SearchParam("model.head_kind", "model.head_kind", "head_kinds", "choice", _frozen),
    SearchParam(
        "model.logistic_c", "model.head_c", "logistic_c", "log", _logistic,
        from_config=_c_or_default("logistic"),
    ),
    SearchParam(
        "model.svm_c", "model.head_c", "svm_c", "log", _svm, from_config=_c_or_default("svm")
    ),
    SearchParam("train.optimizer", "train.optimizer", "optimizers", "choice", _by_gradient),
    SearchParam(
        "train.learning_rate", "train.learning_rate", "learning_rate", "log", _by_gradient
    ),
    SearchParam("train.weight_decay", "train.weight_decay", "weight_decay", "log", _by_gradient),
    SearchParam("data.batch_size", "data.batch_size", "batch_sizes", "choice", _by_gradient),
    SearchParam("model.dropout", "model.dropout", "dropout", "float", _by_gradient),
    SearchParam("model.pooling", "model.pooling", "poolings", "choice"),
    SearchParam("data.image_size", "data.image_size", "image_sizes", "choice", _cnn),
    SearchParam("model.activation", "model.activation", "activations", "choice", _cnn),
    SearchParam("model.depth", "model.depth", "depth", "int", _cnn),
    SearchParam("model.width", "model.width", "widths", "choice", _cnn),
    SearchParam(
        "backbone.image_size", "data.image_size", "backbone_image_sizes", "choice", _backbone
    ),
    SearchParam(
        "model.head_hidden", "model.head_hidden", "head_hidden", "choice", _backbone_by_gradient
    ),
    SearchParam(
        "model.test_time_views", "model.test_time_views", "test_time_views", "choice", _frozen
    ),
    SearchParam(
        "model.feature_stages", "model.feature_stages", "feature_stages", "choice", _frozen,
        to_config=feature_stage_list, from_config=_feature_stage_text,
    ),
    SearchParam(
        "train.encoder_lr_scale", "train.encoder_lr_scale", "encoder_lr_scale", "log", _fine_tuned
    ),
    SearchParam(
        "data.augment_strength", "data.augment_strength", "augment_strength", "float",
        _trains_on_images,
    ),
    SearchParam(
        "data.augmentation", "data.augmentation", "augmentations", "choice", _trains_on_images
    ),
)  # fmt: skip


# a good-only detector's study (--method anomaly): no training, so no optimiser; what
# changes its patches and its bank
DETECTOR_SEARCH = (
    SearchParam("model.name", "model.name", "detector_backbones", "choice"),
    SearchParam("backbone.image_size", "data.image_size", "backbone_image_sizes", "choice"),
    SearchParam(
        "detector.stage_strides", "detector.stage_strides", "detector_strides", "choice",
        to_config=stride_list, from_config=_stride_text,
    ),
    SearchParam(
        "detector.neighbourhood", "detector.neighbourhood", "detector_neighbourhoods", "choice"
    ),
    SearchParam(
        "detector.coreset_ratio", "detector.coreset_ratio", "detector_coreset_ratio", "log"
    ),
    SearchParam("detector.neighbours", "detector.neighbours", "detector_neighbours", "choice"),
    SearchParam(
        "detector.top_patches", "detector.top_patches", "detector_top_patches", "choice"
    ),
)  # fmt: skip


def search_of(method: str) -> tuple[SearchParam, ...]:
    """The parameters a study of ``method`` ("classifier" or "anomaly") samples."""
    return DETECTOR_SEARCH if method == "anomaly" else SEARCH


def detector_backbones(space: SearchSpace) -> tuple[str, ...]:
    """The space's pretrained encoders (the CNN has no features to compare), or the
    detector's default one."""
    return tuple(m for m in space.models if m != "cnn") or (choices.DETECTOR_BACKBONE,)


def domain_of(param: SearchParam, space: SearchSpace, params: dict) -> tuple:
    if param.domain == "learning_rate":  # SGD's good rates are an order of magnitude higher
        return learning_rate_range(space, params["train.optimizer"])
    if param.domain == "detector_backbones":
        return detector_backbones(space)
    return getattr(space, param.domain)


def suggest_params(trial: optuna.Trial, space: SearchSpace, method: str = "classifier") -> dict:
    """Sample one configuration; every parameter first, as Optuna's examples do. Returns
    Optuna names -> values (see :func:`apply_params`)."""
    params: dict[str, Any] = {}
    for param in search_of(method):
        if not param.when(params):
            continue
        domain = domain_of(param, space, params)
        if param.kind == "choice":
            params[param.name] = trial.suggest_categorical(param.name, domain)
        elif param.kind == "int":
            params[param.name] = trial.suggest_int(param.name, *domain)
        else:
            params[param.name] = trial.suggest_float(param.name, *domain, log=param.kind == "log")
    return params


def learning_rate_range(space: SearchSpace, optimizer: str) -> tuple[float, float]:
    """SGD's own range: its good learning rates are an order of magnitude above Adam's."""
    return space.sgd_learning_rate if optimizer == "sgd" else space.learning_rate


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with the sampled ``params`` (Optuna names) put into the fields they set."""
    known = {p.name: p for p in (*SEARCH, *DETECTOR_SEARCH)}
    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}, "detector": {}}
    for key, value in params.items():
        param = known.get(key)
        section, name = (param.target if param else key).split(".", 1)
        sections[section][name] = param.to_config(value) if param else value
    return replace(base, **{s: replace(getattr(base, s), **v) for s, v in sections.items()})


def params_of(config: RunConfig, method: str = "classifier") -> dict[str, Any]:
    """The search's parameters that apply to ``config``, with its values (a trial to
    enqueue)."""
    params: dict[str, Any] = {}
    for param in search_of(method):
        if param.when(params):
            section, name = param.target.split(".", 1)
            params[param.name] = param.from_config(getattr(getattr(config, section), name))
    return params


# the cheap candidate every study tries first: a linear head on the frozen features of the
# backbone whose weights come with qi, with test-time flips/rotations (on the ELPV cells:
# test accuracy 0.862, ROC AUC 0.947 against 0.673 and 0.813 for `qi train`'s CNN)
FROZEN_HEAD = {
    "name": "efficientnet_lite0",
    "finetune": "head",
    "pooling": "avgmax",
    "test_time_views": 8,
}
# and the same head also reading the stride 16 and 32 stages (what the encoder pass that
# caches the features computes anyway)
FROZEN_HEAD_STAGES = (16, 32)
# the heads a study starts with, in order, each where the space holds it: on the ELPV mono
# cells' cached features (5-fold, benchmarks/cached_heads.py) the logistic regression and the
# svm scored above both mlp heads, the logistic in seconds; the linear mlp head only where no
# logistic one may run. The svm (tens of seconds on 2 cores) comes after `qi train`'s
# configuration: before it, it delayed the CNN that wins on the embedded castings past the
# budget (castings test accuracy 0.970 instead of 0.993)
STARTING_HEADS = (
    {"head_kind": "logistic", "head_c": None},
    {"head_kind": "mlp", "head_hidden": 0},
    {"head_kind": "mlp", "head_hidden": 256},
)
AFTER_THE_BASE = ({"head_kind": "svm", "head_c": None},)


def starting_trials(base: RunConfig, space: SearchSpace, method: str = "classifier") -> list[dict]:
    """What a new study runs first, cheap before dear: heads on frozen pretrained features
    (seconds per fit once the features are cached), then `qi train`'s configuration; each
    only where the search space holds it. A detector's study starts from `qi train
    --method anomaly`'s settings."""
    if method == "anomaly":
        model = replace(base.model, name=detector_backbones(space)[0])
        detector = replace(
            base, model=model, data=replace(base.data, image_size=space.backbone_image_sizes[0])
        )
        candidates = [params_of(detector, method)]
        return [c for c in candidates if _inside(c, space, method)]
    first = [k for k in STARTING_HEADS if _inside(params_of(_frozen_head(base, space, k)), space)]
    if any(k["head_kind"] == "logistic" for k in first):  # the linear model, solved exactly
        first = [k for k in first if k != {"head_kind": "mlp", "head_hidden": 0}]
    candidates = [
        *_heads(base, space, first),
        params_of(base),
        *_heads(base, space, AFTER_THE_BASE),
    ]
    return [c for c in candidates if _inside(c, space)]


def _heads(base: RunConfig, space: SearchSpace, kinds) -> list[dict]:
    """Each kind of head on the last map, then also reading the stride 16 and 32 stages."""
    return [
        params_of(_frozen_head(base, space, {**kind, "feature_stages": stages}))
        for kind in kinds
        for stages in dict.fromkeys((base.model.feature_stages, FROZEN_HEAD_STAGES))
    ]


def _frozen_head(base: RunConfig, space: SearchSpace, fields: dict) -> RunConfig:
    head = replace(base, model=replace(base.model, **{**FROZEN_HEAD, **fields}))
    return replace(head, data=replace(head.data, image_size=space.backbone_image_sizes[0]))


def _inside(values: dict[str, Any], space: SearchSpace, method: str = "classifier") -> bool:
    for param in search_of(method):
        if param.name not in values:
            continue
        value, domain = values[param.name], domain_of(param, space, values)
        if param.kind == "choice" and value not in domain:
            return False
        if param.kind != "choice" and not domain[0] <= value <= domain[1]:
            return False
    return True


def describe(tune: TuneConfig) -> dict[str, Any]:
    """The study's settings as flat params for the parent run."""
    flat = {f"tune.{k}": v for k, v in asdict(tune).items() if k != "space"}
    flat["tune.storage"] = redacted(tune.storage)
    flat.update({f"space.{k}": v for k, v in asdict(tune.space).items()})
    return flat
