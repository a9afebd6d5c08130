"""Setting a study up: storage, sampler, pruner, the search space and its mapping to configs.

Optuna parameter names are the config's own dotted names (``train.learning_rate``,
``model.width``...), so a trial's params, its MLflow params and the best configuration all read
the same.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend

from qi.config import RunConfig, SearchSpace, TuneConfig

JOURNAL_FILE = "optuna-studies.journal"


def default_storage_path(tracking_uri: str) -> Path:
    """Next to a local sqlite tracking store; else in the working directory."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        db_file = Path(tracking_uri[len("sqlite:///") :])
        if str(db_file) not in ("", ":memory:"):
            return db_file.expanduser().resolve().parent / JOURNAL_FILE
    return Path.cwd() / JOURNAL_FILE


def storage_label(storage: str | None, tracking_uri: str) -> str:
    """What the user should pass as --storage to reach the same study."""
    return storage or str(default_storage_path(tracking_uri))


def open_storage(storage: str | None, tracking_uri: str) -> optuna.storages.BaseStorage:
    """A database URL (postgresql://, mysql://, sqlite://) or a journal file path.

    A journal file is safe for several processes on one machine (file locks); a database lets
    workers on many machines share one study.
    """
    target = storage_label(storage, tracking_uri)
    if "://" in target:
        return RDBStorage(target, engine_kwargs={"pool_pre_ping": True})
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _tpe(seed: int, epochs: int) -> optuna.samplers.BaseSampler:
    # few startup trials: default budgets are tens of trials, not hundreds
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)


def _random(seed: int, epochs: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


# name -> builder(seed, epochs per trial); the config's choices of sampler come from here
SAMPLERS = {"tpe": _tpe, "random": _random}


def _median(epochs: int) -> optuna.pruners.BasePruner:
    # early validation F1 swings widely: judge a trial only in its second half
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=epochs // 2)


def _hyperband(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)


def _successive_halving(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)


def _no_pruning(epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


# name -> builder(epochs per trial); the config's choices of pruner come from here
PRUNERS = {
    "median": _median,
    "hyperband": _hyperband,
    "successive_halving": _successive_halving,
    "none": _no_pruning,
}


def build_sampler(name: str, seed: int, epochs: int = 0) -> optuna.samplers.BaseSampler:
    return SAMPLERS[name](seed, epochs)


def build_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    return PRUNERS[name](epochs)


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
        space = replace(space, image_sizes=(tune.image_size,))
        base = replace(base, data=replace(base.data, image_size=tune.image_size))
    return base, replace(tune, space=space)


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict:
    """Sample one configuration; every parameter first, as Optuna's examples do."""
    params: dict[str, Any] = {
        "train.optimizer": trial.suggest_categorical("train.optimizer", space.optimizers),
    }
    params["train.learning_rate"] = trial.suggest_float(
        "train.learning_rate", *learning_rate_range(space, params["train.optimizer"]), log=True
    )
    params |= {
        "train.weight_decay": trial.suggest_float(
            "train.weight_decay", *space.weight_decay, log=True
        ),
        "data.batch_size": trial.suggest_categorical("data.batch_size", space.batch_sizes),
        "data.augment_strength": trial.suggest_float(
            "data.augment_strength", *space.augment_strength
        ),
        "model.dropout": trial.suggest_float("model.dropout", *space.dropout),
        "model.name": trial.suggest_categorical("model.name", space.models),
        "data.image_size": trial.suggest_categorical("data.image_size", space.image_sizes),
    }
    if params["model.name"] == "cnn":
        params["model.activation"] = trial.suggest_categorical(
            "model.activation", space.activations
        )
        params["model.depth"] = trial.suggest_int("model.depth", *space.depth)
        params["model.width"] = trial.suggest_categorical("model.width", space.widths)
    return params


def learning_rate_range(space: SearchSpace, optimizer: str) -> tuple[float, float]:
    """SGD's own range: its good learning rates are an order of magnitude above Adam's."""
    return space.sgd_learning_rate if optimizer == "sgd" else space.learning_rate


def apply_params(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with the dotted ``section.field`` values of ``params`` put in."""
    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}}
    for key, value in params.items():
        section, name = key.split(".", 1)
        sections[section][name] = value
    return replace(
        base,
        data=replace(base.data, **sections["data"]),
        model=replace(base.model, **sections["model"]),
        train=replace(base.train, **sections["train"]),
    )


def default_params(base: RunConfig, space: SearchSpace) -> dict | None:
    """``qi train``'s configuration as a trial, when the search space contains it."""
    values = {
        "train.learning_rate": base.train.learning_rate,
        "train.optimizer": base.train.optimizer,
        "train.weight_decay": base.train.weight_decay,
        "data.batch_size": base.data.batch_size,
        "data.augment_strength": base.data.augment_strength,
        "model.dropout": base.model.dropout,
        "model.name": base.model.name,
        "model.activation": base.model.activation,
        "model.depth": base.model.depth,
        "model.width": base.model.width,
        "data.image_size": base.data.image_size,
    }
    if values["model.name"] != "cnn":
        for key in ("model.activation", "model.depth", "model.width"):
            values.pop(key)
    return values if _inside(values, space) else None


def _inside(values: dict[str, Any], space: SearchSpace) -> bool:
    ranges = {
        "train.learning_rate": learning_rate_range(space, values["train.optimizer"]),
        "train.weight_decay": space.weight_decay,
        "data.augment_strength": space.augment_strength,
        "model.dropout": space.dropout,
        "model.depth": space.depth,
    }
    choices = {
        "train.optimizer": space.optimizers,
        "data.batch_size": space.batch_sizes,
        "model.name": space.models,
        "data.image_size": space.image_sizes,
        "model.activation": space.activations,
        "model.width": space.widths,
    }
    for key, value in values.items():
        if key in ranges and not ranges[key][0] <= value <= ranges[key][1]:
            return False
        if key in choices and value not in choices[key]:
            return False
    return True


def describe(tune: TuneConfig) -> dict[str, Any]:
    """The study's settings as flat params for the parent run."""
    flat = {f"tune.{k}": v for k, v in asdict(tune).items() if k != "space"}
    flat.update({f"space.{k}": v for k, v in asdict(tune.space).items()})
    return flat
