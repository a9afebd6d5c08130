"""Pure pieces of a study: storage, sampler, pruner, the search space and its mapping to configs.

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
from qi.models import model_names

SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "successive_halving", "none")
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


def build_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # few startup trials: default budgets are tens of trials, not hundreds
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"unknown sampler '{name}': choose one of {', '.join(SAMPLERS)}")


def build_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "median":
        # early validation F1 swings widely: judge a trial only in its second half
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=epochs // 2)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1)
    if name == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner '{name}': choose one of {', '.join(PRUNERS)}")


def load_search_space(path: Path | None, base: SearchSpace = SearchSpace()) -> SearchSpace:
    """Defaults overridden by a JSON file with any of :class:`SearchSpace`'s fields."""
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
    space = replace(base, **{k: tuple(v) for k, v in raw.items()})
    check_search_space(space)
    return space


def parse_enqueue(text: str | None) -> tuple[dict, ...]:
    """Trials to run first: a JSON object or list of objects, inline or in a file."""
    if not text:
        return ()
    source = Path(text)
    try:
        raw = json.loads(source.read_text() if source.is_file() else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--enqueue needs JSON (inline or a file): {exc}") from exc
    trials = [raw] if isinstance(raw, dict) else raw
    if not isinstance(trials, list) or not all(isinstance(t, dict) for t in trials):
        raise ValueError("--enqueue needs a JSON object or a list of objects")
    return tuple(trials)


def check_search_space(space: SearchSpace) -> None:
    bad = [m for m in space.models if m not in model_names()]
    if bad:
        raise ValueError(f"unknown model(s) {bad} in the search space: choose from {model_names()}")
    ranges = ("learning_rate", "sgd_learning_rate", "weight_decay", "dropout", "depth")
    for name in (*ranges, "augment_strength"):
        low, high = getattr(space, name)
        if low > high:
            raise ValueError(f"search space {name}: low {low} is above high {high}")


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
