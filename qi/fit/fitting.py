"""Fitting one configuration: the Trainer, the data it sees, the best epoch restored."""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import mlflow
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sklearn.model_selection import StratifiedKFold
from torch import nn

from qi.choices import metric_mode, validate_metric
from qi.config import RunConfig, TrainConfig
from qi.data.datamodule import (
    FeatureDataModule,
    InspectionDataModule,
    PreparedData,
    positive_weight,
)
from qi.data.embeddings import embeddings
from qi.data.types import learnable_types
from qi.fit.callbacks import (
    AttachedMLFlowLogger,
    Checkpoints,
    WarmEarlyStopping,
    fit_interruptibly,
)
from qi.fit.estimators import fit_estimator_head, fitted_by_scikit_learn
from qi.fit.module import InspectionModule
from qi.fit.precision import trainer_precision
from qi.models import InspectionNet, build_model, has_frozen_encoder
from qi.models.parts import HeadOnViews
from qi.views import VIEWS


@dataclass
class FitResult:
    net: InspectionNet  # best epoch's weights, in eval mode on the CPU
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, float]  # at the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def fit(
    config: RunConfig,
    data: PreparedData,
    run_id: str | None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> FitResult:
    """Train ``config`` on ``data``, logging per-epoch metrics to MLflow run ``run_id``."""
    train = config.train
    monitor = validate_metric(train.monitor)
    pl.seed_everything(train.seed, workers=True, verbose=False)
    types = defect_types_to_learn(config, data)
    net = build_model(
        config.model, data.preprocess.channels, data.preprocess.image_size, defect_types=types
    )
    estimated = fitted_by_scikit_learn(config.model)
    if net.finetune == "head":  # a frozen encoder: train the head on its cached features
        datamodule = feature_datamodule(net, data, config, progress)
        learner: nn.Module = HeadOnViews(net.head)
    else:
        datamodule, learner = InspectionDataModule(data, config.data, types), net
    weight = data.positive_weight() if train.balance_classes else 1.0
    module = InspectionModule(learner, train, positive_weight=weight, n_types=len(types))
    # channels_last: faster convolutions on CPU (oneDNN) and on GPU tensor cores alike
    module = module.to(memory_format=torch.channels_last)
    logger = None
    if run_id is not None:
        logger = AttachedMLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)
    if estimated:  # scikit-learn fits it at once; Lightning scores it as it scores an epoch
        started = time.perf_counter()
        fit_estimator_head(
            net.head, *datamodule.training_arrays, config.model, train.balance_classes
        )
        validate(module, datamodule, train, logger)
        seconds = time.perf_counter() - started
    else:
        seconds = train_and_restore_best(module, datamodule, train, logger, callbacks, progress)
    best = _best_epoch(module.history, monitor)
    epochs_run = len(module.history)
    n_train = int((data.frame["split"] == "train").sum())
    limit = train.limit_batches
    if isinstance(limit, int):
        n_train = min(n_train, limit * config.data.batch_size)
    elif isinstance(limit, float):
        n_train = int(n_train * limit)
    net = net.to("cpu").eval()  # the head trained in place, also behind HeadOnViews
    return FitResult(
        net=net,
        best_epoch=int(best.get("epoch", 0)),
        epochs_run=epochs_run,
        val_metrics={k: v for k, v in best.items() if k != "epoch"},
        history=module.history,
        seconds=seconds,
        images_per_second=n_train * epochs_run / seconds if seconds > 0 else 0.0,
    )


def train_and_restore_best(
    module: InspectionModule,
    datamodule: pl.LightningDataModule,
    train: TrainConfig,
    logger: AttachedMLFlowLogger | None = None,
    callbacks: Sequence[Callback] = (),
    progress: bool = True,
) -> float:
    """Lightning's fit of ``module`` with early stopping on ``train.monitor``; the best
    epoch's weights restored in place. Returns the fit's seconds."""
    monitor = validate_metric(train.monitor)
    with tempfile.TemporaryDirectory(prefix="qi-ckpt-") as ckpt_dir:
        checkpoint = ModelCheckpoint(
            dirpath=ckpt_dir,
            monitor=monitor,
            mode=metric_mode(monitor),
            save_top_k=1,
            save_weights_only=True,
        )
        stopper = WarmEarlyStopping(
            monitor=monitor,
            mode=metric_mode(monitor),
            patience=train.early_stopping_patience,
            min_epochs=train.early_stopping_after,
        )
        limit = train.limit_batches
        trainer = pl.Trainer(
            max_epochs=train.epochs,
            accelerator=train.accelerator,
            devices=1,
            precision=trainer_precision(train),
            logger=logger if logger is not None else False,
            callbacks=[checkpoint, stopper, Checkpoints(), *callbacks],
            enable_progress_bar=progress,
            enable_model_summary=False,
            deterministic=train.deterministic,
            num_sanity_val_steps=0,
            limit_train_batches=limit,
            limit_val_batches=limit,
            default_root_dir=ckpt_dir,
            log_every_n_steps=1,
            max_time=None if train.max_seconds is None else {"seconds": max(train.max_seconds, 1)},
        )
        started = time.perf_counter()
        with warnings.catch_warnings():
            # on 2 cores with in-memory data, extra loader workers cost more than they give
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            fit_interruptibly(trainer, module, datamodule)
        seconds = time.perf_counter() - started
        if checkpoint.best_model_path:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.load_state_dict(state["state_dict"])
    return seconds


def validate(
    module: InspectionModule,
    datamodule: pl.LightningDataModule,
    train: TrainConfig,
    logger: AttachedMLFlowLogger | None = None,
) -> None:
    """One validation pass of ``module`` as it is (a head fitted outside Lightning): its
    figures logged and kept in ``module.history`` as an epoch's are."""
    trainer = pl.Trainer(
        accelerator=train.accelerator,
        devices=1,
        precision=trainer_precision(train),
        logger=logger if logger is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=train.limit_batches,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.validate(module, datamodule=datamodule, verbose=False)


def out_of_fold_probabilities(
    config: RunConfig, data: PreparedData, folds: int, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, defect probabilities) of every train and validation image, each from a head
    fitted on the other ``folds - 1`` folds of them (stratified, seeded) with early stopping
    on its own fold: cross-validation of a head on a frozen encoder's cached features, which
    costs a few head fits and no encoder pass. Each fold's head starts from the seed, as the
    trial's own does."""
    if not has_frozen_encoder(config.model):
        raise ValueError("cross-validation is for heads on a frozen pretrained encoder")
    train = config.train
    types = defect_types_to_learn(config, data)
    net = build_model(
        config.model, data.preprocess.channels, data.preprocess.image_size, defect_types=types
    )
    split = [data.targets(name, types) for name in ("train", "val")]
    targets = np.concatenate([s[1] for s in split])
    labels = (targets[:, 0] if targets.ndim == 2 else targets).astype(int)
    # each split's features under its own cache key, as the trial's fit reads them
    # (:func:`feature_datamodule`): the folds then cost no encoder pass of their own
    features = np.concatenate(
        [embeddings(net, s[0], views=VIEWS, progress=progress) for s in split], axis=1
    )  # (8, N, D)
    views = config.model.test_time_views
    probabilities = np.zeros(len(labels))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=train.seed)
    weight = positive_weight(labels) if train.balance_classes else 1.0
    for fitted, held in splitter.split(labels, labels):
        pl.seed_everything(train.seed, workers=True, verbose=False)
        head = build_model(
            config.model, data.preprocess.channels, data.preprocess.image_size, types
        ).head
        learner = HeadOnViews(head)
        if fitted_by_scikit_learn(config.model):  # it sets the standardisation itself
            fit_estimator_head(
                head, features[:, fitted], targets[fitted], config.model, train.balance_classes
            )
        else:
            head[0].set_from(torch.from_numpy(features[:, fitted].reshape(-1, features.shape[-1])))
            datamodule = FeatureDataModule(
                features[:, fitted], targets[fitted], features[:views, held], targets[held],
                config.data,
            )  # fmt: skip
            module = InspectionModule(learner, train, positive_weight=weight, n_types=len(types))
            train_and_restore_best(module, datamodule, train, progress=False)
        with torch.inference_mode():
            held_features = torch.from_numpy(features[:views, held]).permute(1, 0, 2)
            probabilities[held] = torch.sigmoid(learner.eval()(held_features)).numpy()
    return labels, probabilities


def defect_types_to_learn(config: RunConfig, data: PreparedData) -> tuple[str, ...]:
    """The types the model learns: none under ``--defect-types off``, else those the data
    names often enough (:func:`qi.data.types.learnable_types`)."""
    if config.model.defect_types == "off":
        return ()
    return learnable_types(data.frame)


def feature_datamodule(net, data: PreparedData, config: RunConfig, progress: bool):
    """Cached features of the frozen encoder: every flip/rotation of the training images
    (honest augmentation), the model's test-time views of the validation images; the head's
    standardisation is set from the training features."""
    train_images, train_labels = data.targets("train", net.defect_types)
    val_images, val_labels = data.targets("val", net.defect_types)
    train = embeddings(net, train_images, views=VIEWS, progress=progress)
    val = embeddings(net, val_images, views=config.model.test_time_views, progress=progress)
    net.head[0].set_from(torch.from_numpy(train.reshape(-1, train.shape[-1])))
    return FeatureDataModule(train, train_labels, val, val_labels, config.data)


def _best_epoch(history: list[dict[str, float]], monitor: str) -> dict[str, float]:
    scored = [h for h in history if monitor in h and h[monitor] == h[monitor]]  # drop NaN
    if not scored:
        return history[-1] if history else {}
    pick = min if metric_mode(monitor) == "min" else max
    return pick(scored, key=lambda h: h[monitor])
