"""Setting a study up: storage, sampler, pruner, the search space and its mapping to configs.

Optuna parameter names are the config's own dotted names (``train.learning_rate``,
``model.width``...), so a trial's params, its MLflow params and the best configuration all read
the same.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
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


def public_label(storage: str | None, tracking_uri: str) -> str:
    """:func:`storage_label` without a password, for what others read (tags, params)."""
    return redacted(storage_label(storage, tracking_uri))


class StorageError(RuntimeError):
    """The study's storage cannot be used; the message says which and what to do."""


@dataclass(frozen=True)
class Heartbeat:
    """Optuna's trial heartbeat on database storages (see :mod:`qi.study.recovery`)."""

    interval: int = 20
    grace_period: int = 60
    max_retry: int = 2

    def __post_init__(self) -> None:
        if self.grace_period <= self.interval:
            raise StorageError(
                f"--grace-period {self.grace_period} must exceed --heartbeat-interval "
                f"{self.interval}: a live worker would be declared dead"
            )


def database_url(url: str) -> str:
    """A bare ``postgresql://`` means psycopg 3 to SQLAlchemy 2.1; qi installs psycopg2, so a
    bare URL gets that driver when psycopg 3 is absent."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def redacted(url: str | None) -> str | None:
    """The storage URL without its password: for messages, tags, params and status output."""
    if url is None:
        return None
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@", 1)
    return url


def open_storage(
    storage: str | None, tracking_uri: str, heartbeat: Heartbeat | None = None
) -> optuna.storages.BaseStorage:
    """A database URL (postgresql://, mysql://, sqlite://) or a journal file path.

    A journal file is safe for several processes on one machine (file locks); a database lets
    workers on many machines share one study, and with ``heartbeat`` a trial of a worker that
    died anywhere is failed and retried. A database that cannot be reached, refuses the
    credentials or lacks its driver is a :class:`StorageError`, before any training.
    """
    target = storage_label(storage, tracking_uri)
    if "://" in target:
        return _open_database(database_url(target), heartbeat)
    path = Path(target).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _open_database(url: str, heartbeat: Heartbeat | None) -> RDBStorage:
    import sqlalchemy.exc

    from qi.study.recovery import StaleTrialCleanup

    beats = {}
    if heartbeat is not None:
        beats = dict(
            heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace_period,
            heartbeat_stale_trial_callback=StaleTrialCleanup(heartbeat.max_retry),
        )
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(url, engine_kwargs={"pool_pre_ping": True}, **beats)
            except sqlalchemy.exc.IntegrityError:
                # workers starting together on a new database all create Optuna's schema:
                # one wins, the others find it made once they look again
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (ImportError, sqlalchemy.exc.NoSuchModuleError):
        raise StorageError(
            f"storage {redacted(url)}: its database driver is missing; install it (pip install "
            "psycopg2-binary for postgresql+psycopg2://, mysqlclient for mysql://)"
        ) from None
    except sqlalchemy.exc.OperationalError as exc:
        cause = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise StorageError(
            f"storage {redacted(url)} cannot be used: {cause}; check the host, port, user, "
            "password and database name"
        ) from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise StorageError(f"storage {redacted(url)} is not a database URL: {exc}") from None


def _tpe(seed: int, epochs: int) -> optuna.samplers.BaseSampler:
    # few startup trials: default budgets are tens of trials, not hundreds; group: the space
    # is conditional (CNN and backbone parameters never appear together)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=5, multivariate=True, group=True
        )


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


def _cnn(params: dict) -> bool:
    return params["model.name"] == "cnn"


def _backbone(params: dict) -> bool:
    return params["model.name"] != "cnn"


def _frozen(params: dict) -> bool:
    return _backbone(params) and params["model.finetune"] == "head"


def _trains_on_images(params: dict) -> bool:
    return not _frozen(params)


def _fine_tuned(params: dict) -> bool:
    return _backbone(params) and params["model.finetune"] != "head"


def _always(params: dict) -> bool:
    return True


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


# in sampling order: conditions may read what is sampled before them
SEARCH = (
    SearchParam("model.name", "model.name", "models", "choice"),
    SearchParam("model.finetune", "model.finetune", "finetune", "choice", _backbone),
    SearchParam("train.optimizer", "train.optimizer", "optimizers", "choice"),
    SearchParam("train.learning_rate", "train.learning_rate", "learning_rate", "log"),
    SearchParam("train.weight_decay", "train.weight_decay", "weight_decay", "log"),
    SearchParam("data.batch_size", "data.batch_size", "batch_sizes", "choice"),
    SearchParam("model.dropout", "model.dropout", "dropout", "float"),
    SearchParam("model.pooling", "model.pooling", "poolings", "choice"),
    SearchParam("data.image_size", "data.image_size", "image_sizes", "choice", _cnn),
    SearchParam("model.activation", "model.activation", "activations", "choice", _cnn),
    SearchParam("model.depth", "model.depth", "depth", "int", _cnn),
    SearchParam("model.width", "model.width", "widths", "choice", _cnn),
    SearchParam(
        "backbone.image_size", "data.image_size", "backbone_image_sizes", "choice", _backbone
    ),
    SearchParam("model.head_hidden", "model.head_hidden", "head_hidden", "choice", _backbone),
    SearchParam(
        "model.test_time_views", "model.test_time_views", "test_time_views", "choice", _frozen
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


def domain_of(param: SearchParam, space: SearchSpace, params: dict) -> tuple:
    if param.domain == "learning_rate":  # SGD's good rates are an order of magnitude higher
        return learning_rate_range(space, params["train.optimizer"])
    return getattr(space, param.domain)


def suggest_params(trial: optuna.Trial, space: SearchSpace) -> dict:
    """Sample one configuration; every parameter first, as Optuna's examples do. Returns
    Optuna names -> values (see :func:`apply_params`)."""
    params: dict[str, Any] = {}
    for param in SEARCH:
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
    targets = {p.name: p.target for p in SEARCH}
    sections: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "train": {}}
    for key, value in params.items():
        section, name = targets.get(key, key).split(".", 1)
        sections[section][name] = value
    return replace(
        base,
        data=replace(base.data, **sections["data"]),
        model=replace(base.model, **sections["model"]),
        train=replace(base.train, **sections["train"]),
    )


def params_of(config: RunConfig) -> dict[str, Any]:
    """The search's parameters that apply to ``config``, with its values (a trial to
    enqueue)."""
    params: dict[str, Any] = {}
    for param in SEARCH:
        if param.when(params):
            section, name = param.target.split(".", 1)
            params[param.name] = getattr(getattr(config, section), name)
    return params


def default_params(base: RunConfig, space: SearchSpace) -> dict | None:
    """``qi train``'s configuration as a trial, when the search space contains it."""
    values = params_of(base)
    return values if _inside(values, space) else None


# the cheap candidate every study tries first: a linear head on the frozen features of the
# backbone whose weights come with qi, with test-time flips/rotations (on the ELPV cells:
# test accuracy 0.862, ROC AUC 0.947 against 0.673 and 0.813 for `qi train`'s CNN)
FROZEN_HEAD = {
    "name": "efficientnet_lite0",
    "finetune": "head",
    "pooling": "avgmax",
    "test_time_views": 8,
}


def starting_trials(base: RunConfig, space: SearchSpace) -> list[dict]:
    """What a new study runs first, cheap before dear: heads on frozen pretrained features
    (seconds per fit once the features are cached), then `qi train`'s configuration; each
    only where the search space holds it."""
    heads = []
    for hidden in (0, 256):  # a linear head, then one hidden layer
        head = replace(base, model=replace(base.model, **FROZEN_HEAD, head_hidden=hidden))
        heads.append(
            replace(head, data=replace(head.data, image_size=space.backbone_image_sizes[0]))
        )
    candidates = [*(params_of(h) for h in heads), params_of(base)]
    return [c for c in candidates if _inside(c, space)]


def _inside(values: dict[str, Any], space: SearchSpace) -> bool:
    for param in SEARCH:
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
