"""Fitting one configuration: the LightningModule, its metrics and optimizers, and :func:`fit`.

This is a library, not a command: :func:`fit` is what ``qi train`` (:mod:`qi.train`) and every
Optuna trial (:mod:`qi.study.trials`) call: it takes prepared data and an
MLflow run id owned by the caller, trains with early stopping, restores the best epoch and
returns the network with its validation figures. It never starts or ends MLflow runs; the
caller owns them. The test split is scored by :mod:`qi.evaluation`, once, at the chosen
threshold and at 0.5 (a Lightning test pass would log ``test/*`` twice, at 0.5).
"""

from __future__ import annotations

import logging
import signal
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
import mlflow
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)

from qi import interrupts
from qi.config import RunConfig, TrainConfig
from qi.data.datamodule import FeatureDataModule, InspectionDataModule, PreparedData
from qi.data.embeddings import embeddings
from qi.models import InspectionNet, build_model
from qi.models.parts import HeadOnViews

log = logging.getLogger(__name__)

# name -> torchmetrics class, computed per stage (train/val) and epoch with the defective
# class as the positive one; the first is a study's default objective
STAGE_METRICS = {
    "f1": BinaryF1Score,
    "auroc": BinaryAUROC,
    "acc": BinaryAccuracy,
    "defect_recall": BinaryRecall,
    "precision": BinaryPrecision,
}
# what a caller may monitor or optimise; "loss" is minimised, the rest maximised
METRIC_NAMES = (*STAGE_METRICS, "loss")


def objective_metrics() -> list[str]:
    """What a study may optimise: every validation metric."""
    return [f"val/{m}" for m in METRIC_NAMES]


def _adamw(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=c.learning_rate, weight_decay=c.weight_decay)


def _adam(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=c.learning_rate, weight_decay=c.weight_decay)


def _sgd(params, c: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params,
        lr=c.learning_rate,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        nesterov=c.momentum > 0,
    )


# name -> builder; the config's choices of optimizer come from here
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
}


def metric_mode(metric: str) -> str:
    """ "min" for losses, "max" for every other metric."""
    return "min" if metric.rsplit("/", 1)[-1] == "loss" else "max"


def validate_metric(metric: str) -> str:
    stage, _, name = metric.rpartition("/")
    if stage not in ("val", "train") or name not in METRIC_NAMES:
        choices = ", ".join(f"val/{m}" for m in METRIC_NAMES)
        raise ValueError(f"unknown metric '{metric}': choose one of {choices}")
    return metric


def classification_metrics() -> MetricCollection:
    """One stage's metrics (see :data:`STAGE_METRICS`)."""
    return MetricCollection({name: metric() for name, metric in STAGE_METRICS.items()})


class InspectionModule(pl.LightningModule):
    """Binary defect classifier around any :class:`InspectionNet`."""

    def __init__(self, net: InspectionNet, config: TrainConfig, positive_weight: float = 1.0):
        super().__init__()
        self.net = net
        self.config = config
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight))
        self.stage_metrics = nn.ModuleDict(
            {f"{stage}_metrics": classification_metrics() for stage in ("train", "val", "test")}
        )
        self.history: list[dict[str, float]] = []  # validation figures per epoch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)

    def parameter_groups(self) -> list[dict]:
        """What learns: a pretrained encoder's layers at ``encoder_lr_scale`` times the
        learning rate (they start from good weights), everything else at the full rate."""
        encoder = getattr(self.net, "encoder", None)
        pretrained = encoder is not None and getattr(self.net, "pretrained", False)
        learning = [p for p in self.net.parameters() if p.requires_grad]
        if not pretrained:
            return [{"params": learning}]
        in_encoder = {id(p) for p in encoder.parameters()}
        scale = self.config.encoder_lr_scale
        groups = [
            {"params": [p for p in learning if id(p) not in in_encoder]},
            {
                "params": [p for p in learning if id(p) in in_encoder],
                "lr": self.config.learning_rate * scale,
            },
        ]
        return [g for g in groups if g["params"]]

    def model_step(self, batch, stage: str) -> torch.Tensor:
        inputs, labels = batch
        if inputs.dim() == 4:  # images; features are (N, views, D)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        logits = self(inputs)
        loss = self.loss_fn(logits, labels)
        self.stage_metrics[f"{stage}_metrics"].update(
            torch.sigmoid(logits.detach().float()), labels.long()
        )
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
            prog_bar=stage != "test",
        )
        return loss

    def training_step(self, batch, batch_idx):
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self.model_step(batch, "test")

    def _log_epoch_metrics(self, stage: str) -> dict[str, float]:
        metrics = self.stage_metrics[f"{stage}_metrics"]
        values = {f"{stage}/{k}": v for k, v in metrics.compute().items()}
        metrics.reset()
        # "step" makes Lightning log this epoch's figures at step=epoch: curves per epoch
        self.log_dict({**values, "step": float(self.current_epoch)}, prog_bar=False)
        return {k: float(v) for k, v in values.items()}

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.stage_metrics["val_metrics"].reset()
            return
        values = self._log_epoch_metrics("val")
        values["val/loss"] = float(self.trainer.callback_metrics.get("val/loss", float("nan")))
        self.history.append({"epoch": self.current_epoch, **values})

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def configure_optimizers(self):
        c = self.config
        optimizer = OPTIMIZERS[c.optimizer](self.parameter_groups(), c)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(c.epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": schedule}


class WarmEarlyStopping(EarlyStopping):
    """Early stopping that does not act before ``min_epochs``.

    In a study a slow starter must live until the pruner judges it: a depth-4 trial that a
    5-epoch patience ended at epoch 8 (validation F1 0.73) reached 0.98 when let run. Unlike
    the Trainer's ``min_epochs`` this leaves ``max_time`` (a study's deadline) in force.
    """

    def __init__(self, *args, min_epochs: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.min_epochs = min_epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.min_epochs:
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.min_epochs:
            super().on_validation_end(trainer, pl_module)


class AttachedMLFlowLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to a run qi owns: it must not end that run."""

    def finalize(self, status: str = "success") -> None:  # noqa: D102
        return None


@dataclass
class FitResult:
    net: InspectionNet  # best epoch's weights, in eval mode on the CPU
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, float]  # at the best epoch
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): there, bf16 autocast
    runs convolutions about twice as fast as fp32; elsewhere it is emulated and slower."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in some builds
        return False


def trainer_precision(config: TrainConfig) -> str:
    """Mixed precision where the hardware computes it natively, full precision elsewhere.

    bf16 keeps fp32's range, so it needs no loss scaling and trains to the same figures (the
    weights stay fp32; only activations and products are bf16): measured on the embedded data,
    same test accuracy at 1.8x the speed on a 2-core AVX512-BF16 CPU.
    """
    if config.precision:
        return config.precision
    if config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if config.accelerator in ("auto", "cpu") and cpu_computes_bf16():
        return "bf16-mixed"
    return "32-true"


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
    net = build_model(config.model, data.preprocess.channels, data.preprocess.image_size)
    if net.finetune == "head":  # a frozen encoder: train the head on its cached features
        datamodule = feature_datamodule(net, data, config, progress)
        learner: nn.Module = HeadOnViews(net.head)
    else:
        datamodule, learner = InspectionDataModule(data, config.data), net
    weight = data.positive_weight() if train.balance_classes else 1.0
    module = InspectionModule(learner, train, positive_weight=weight)
    # channels_last: faster convolutions on CPU (oneDNN) and on GPU tensor cores alike
    module = module.to(memory_format=torch.channels_last)
    logger = None
    if run_id is not None:
        logger = AttachedMLFlowLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run_id)
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
            limit_test_batches=limit,
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
        best = _best_epoch(module.history, monitor)
    epochs_run = len(module.history)
    n_train = int((data.frame["split"] == "train").sum())
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


def feature_datamodule(net, data: PreparedData, config: RunConfig, progress: bool):
    """Cached features of the frozen encoder: every flip/rotation of the training images
    (honest augmentation), the model's test-time views of the validation images; the head's
    standardisation is set from the training features."""
    train_images, train_labels = data.split("train")
    val_images, val_labels = data.split("val")
    train = embeddings(net, train_images, views=8, progress=progress)
    val = embeddings(net, val_images, views=config.model.test_time_views, progress=progress)
    net.head[0].set_from(torch.from_numpy(train.reshape(-1, train.shape[-1])))
    return FeatureDataModule(train, train_labels, val, val_labels, config.data)


class Checkpoints(Callback):
    """Each training and validation batch is a :func:`qi.interrupts.checkpoint`."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        interrupts.checkpoint("fit")

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            interrupts.checkpoint("validation")


def fit_interruptibly(trainer: pl.Trainer, module, datamodule) -> None:
    """``trainer.fit`` that lets Ctrl-C through as ``KeyboardInterrupt``.

    Lightning answers Ctrl-C with ``sys.exit(1)`` and ignores SIGINT from then on; a study
    must instead see the interrupt (to mark the trial and the runs) and stay interruptible.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=datamodule)
    except SystemExit as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from exc
        raise
    finally:
        signal.signal(signal.SIGINT, previous)


def _best_epoch(history: list[dict[str, float]], monitor: str) -> dict[str, float]:
    scored = [h for h in history if monitor in h and h[monitor] == h[monitor]]  # drop NaN
    if not scored:
        return history[-1] if history else {}
    pick = min if metric_mode(monitor) == "min" else max
    return pick(scored, key=lambda h: h[monitor])
