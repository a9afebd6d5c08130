"""The LightningModule: a binary defect classifier around any network, with per-stage metrics.

A network that learns defect types adds the cross-entropy of its type logits over the
defective images whose type it learns (target -1 elsewhere) to the defect's loss, with equal
weight, and reports ``<stage>/type_macro_f1`` over those images.

One shared :meth:`InspectionModule.model_step` for training and validation; the metrics of each
stage are their own torchmetrics collection, logged as ``train/<m>`` and ``val/<m>`` per epoch
(step = epoch). The test split is not scored here but by :mod:`qi.evaluation`, once, at the
chosen threshold.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
    MulticlassF1Score,
)

from qi.config import TrainConfig
from qi.fit.optimizers import OPTIMIZERS

# name -> torchmetrics class (keyed by qi.choices.STAGE_METRICS), computed per stage and epoch
# with the defective class as the positive one
STAGE_METRICS = {
    "f1": BinaryF1Score,
    "auroc": BinaryAUROC,
    "acc": BinaryAccuracy,
    "defect_recall": BinaryRecall,
    "precision": BinaryPrecision,
}
STAGES = ("train", "val")


def classification_metrics() -> MetricCollection:
    """One stage's metrics (see :data:`STAGE_METRICS`)."""
    return MetricCollection({name: metric() for name, metric in STAGE_METRICS.items()})


class InspectionModule(pl.LightningModule):
    """Binary defect classifier around any :class:`InspectionNet`."""

    def __init__(
        self, net: nn.Module, config: TrainConfig, positive_weight: float = 1.0, n_types: int = 0
    ):
        super().__init__()
        self.net = net
        self.config = config
        self.loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_weight))
        self.stage_metrics = nn.ModuleDict(
            {f"{stage}_metrics": classification_metrics() for stage in STAGES}
        )
        self.n_types = n_types
        if n_types:
            self.type_metrics = nn.ModuleDict(
                {
                    f"{stage}_types": MulticlassF1Score(num_classes=n_types, average="macro")
                    for stage in STAGES
                }
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
        inputs, targets = batch
        if inputs.dim() == 4:  # images; features are (N, views, D)
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        outputs = self.net.all_logits(inputs)
        labels = targets[:, 0] if targets.dim() == 2 else targets
        logits = outputs[:, 0]
        loss = self.loss_fn(logits, labels)
        if self.n_types:
            loss = loss + self._type_loss(outputs[:, 1:], targets[:, 1].long(), stage)
        self.stage_metrics[f"{stage}_metrics"].update(
            torch.sigmoid(logits.detach().float()), labels.long()
        )
        self.log(
            f"{stage}/loss",
            loss,
            on_step=False,
            on_epoch=True,
            batch_size=len(labels),
            prog_bar=True,
        )
        return loss

    def _type_loss(self, type_logits: torch.Tensor, types: torch.Tensor, stage: str):
        known = types >= 0
        if not known.any():
            return type_logits.sum() * 0.0  # keeps the graph whole when a batch has none
        logits, types = type_logits[known].float(), types[known]
        self.type_metrics[f"{stage}_types"].update(logits.detach().argmax(1), types)
        loss = F.cross_entropy(logits, types)
        self.log(f"{stage}/type_loss", loss, on_step=False, on_epoch=True, batch_size=len(types))
        return loss

    def training_step(self, batch, batch_idx):
        return self.model_step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self.model_step(batch, "val")

    def _log_epoch_metrics(self, stage: str) -> dict[str, float]:
        metrics = self.stage_metrics[f"{stage}_metrics"]
        values = {f"{stage}/{k}": v for k, v in metrics.compute().items()}
        metrics.reset()
        if self.n_types:
            types = self.type_metrics[f"{stage}_types"]
            if types.update_count:
                values[f"{stage}/type_macro_f1"] = types.compute()
            types.reset()
        # "step" makes Lightning log this epoch's figures at step=epoch: curves per epoch
        self.log_dict({**values, "step": float(self.current_epoch)}, prog_bar=False)
        return {k: float(v) for k, v in values.items()}

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.stage_metrics["val_metrics"].reset()
            if self.n_types:
                self.type_metrics["val_types"].reset()
            return
        values = self._log_epoch_metrics("val")
        values["val/loss"] = float(self.trainer.callback_metrics.get("val/loss", float("nan")))
        self.history.append({"epoch": self.current_epoch, **values})

    def configure_optimizers(self):
        c = self.config
        optimizer = OPTIMIZERS[c.optimizer](self.parameter_groups(), c)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(c.epochs, 1))
        return {"optimizer": optimizer, "lr_scheduler": schedule}
