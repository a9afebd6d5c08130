"""Held-out evaluation: metrics at the operating threshold and at 0.5, per-defect-type recall.

The threshold is chosen on the *validation* split (:mod:`qi.evaluation.operating_point`) and
the *test* split, never seen by training or tuning, reports the figures. Everything here is
computed from (labels, scores) with scikit-learn and is free of side effects; running a
network to get the scores is :mod:`qi.evaluation.scoring`, plotting and logging
:mod:`qi.evaluation.report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    classification_report,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from qi import choices
from qi.evaluation.operating_point import (
    false_alarm_warning,
    rates,
    threshold_origin,
    tradeoff,
    tradeoff_markdown,
)
from qi.evaluation.types import TypeEvaluation
from qi.inference import LABELS, decide

# test metrics a new model version may be compared on (keys of binary_metrics)
PROMOTION_METRICS = choices.PROMOTION_METRICS


def _ranking(function):
    """A threshold-free metric of the scores: nan where only one class is present."""
    return lambda labels, scores, predicted: (
        function(labels, scores) if len(np.unique(labels)) == 2 else float("nan")
    )


# name -> f(labels, scores, predicted at the threshold)
METRIC_FUNCTIONS = {
    "acc": lambda y, s, p: accuracy_score(y, p),
    "precision": lambda y, s, p: precision_score(y, p, zero_division=0),
    "defect_recall": lambda y, s, p: recall_score(y, p, zero_division=0),
    "ok_recall": lambda y, s, p: recall_score(y, p, pos_label=0, zero_division=0),
    "f1": lambda y, s, p: f1_score(y, p, zero_division=0),
    "macro_f1": lambda y, s, p: f1_score(y, p, average="macro", zero_division=0),
    "auroc": _ranking(roc_auc_score),
    "average_precision": _ranking(average_precision_score),
    "log_loss": lambda y, s, p: log_loss(y, np.clip(s, 1e-7, 1 - 1e-7), labels=[0, 1]),
}


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, defect recall, F1 (defective class and macro) at ``threshold``;
    ROC AUC, average precision and log loss over the scores (threshold-free: they still rank
    models whose accuracy ties on a few hundred images)."""
    predicted = decide(scores, threshold)
    return {name: f(labels, scores, predicted) for name, f in METRIC_FUNCTIONS.items()}


def metric_value(name: str, labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """One of :func:`binary_metrics`, alone (what a bootstrap recomputes a thousand times)."""
    return float(METRIC_FUNCTIONS[name](labels, scores, decide(scores, threshold)))


def recall_by_defect_type(
    frame: pd.DataFrame, scores: np.ndarray, threshold: float
) -> pd.DataFrame:
    """Per defect type: images, caught, recall. Shows which kinds of defects slip through."""
    table = frame.assign(caught=decide(scores, threshold).astype(bool))
    table = table[table["label"] == 1]
    grouped = table.groupby("defect_type")["caught"].agg(images="size", caught="sum")
    grouped["recall"] = grouped["caught"] / grouped["images"]
    return grouped.reset_index().sort_values("recall").reset_index(drop=True)


@dataclass
class Evaluation:
    """Test-split figures of one model at its operating threshold and at 0.5."""

    threshold: float
    target_recall: float | None  # None: the model's boundary 0.5 (or its own threshold)
    labels: np.ndarray
    scores: np.ndarray
    frame: pd.DataFrame  # the split's rows (image_path, label, defect_type)
    metrics: dict[str, float]  # at ``threshold``
    metrics_at_half: dict[str, float]
    report: dict = field(default_factory=dict)  # scikit-learn classification report
    report_text: str = ""
    by_defect_type: pd.DataFrame | None = None
    tradeoff: pd.DataFrame | None = None  # operating points on validation and test
    val_false_alarms: float | None = None  # share of good validation parts flagged
    types: TypeEvaluation | None = None  # which defect: a model that learned types
    # share of validation resamples in which the balanced threshold beat 0.5 (None: not
    # weighed: a target recall, or a model with its own threshold)
    threshold_evidence: float | None = None

    @property
    def threshold_origin(self) -> str:
        return threshold_origin(self.target_recall, self.threshold_evidence)

    @property
    def predicted(self) -> np.ndarray:
        return decide(self.scores, self.threshold)

    @property
    def test_false_alarms(self) -> float:
        return rates(self.labels, self.scores, self.threshold)[1]

    @property
    def warning(self) -> str | None:
        """A line for the user when the operating point flags too many good parts."""
        if self.val_false_alarms is not None:
            line = false_alarm_warning(self.val_false_alarms, self.threshold, "validation")
            if line:
                return line
        return false_alarm_warning(self.test_false_alarms, self.threshold, "test")

    def tradeoff_markdown(self) -> str:
        return "" if self.tradeoff is None else tradeoff_markdown(self.tradeoff)

    def confusion(self, normalize: str | None = None) -> np.ndarray:
        return confusion_matrix(self.labels, self.predicted, labels=[0, 1], normalize=normalize)

    def flat_metrics(self, prefix: str = "test") -> dict[str, float]:
        """MLflow metric names: ``test/<m>`` at the threshold, ``test_at_0.5/<m>`` at 0.5."""
        flat = {f"{prefix}/{k}": v for k, v in self.metrics.items()}
        flat |= {f"{prefix}_at_0.5/{k}": v for k, v in self.metrics_at_half.items()}
        matrix = self.confusion()
        for i, true in enumerate(LABELS):
            for j, pred in enumerate(LABELS):
                flat[f"{prefix}/confusion_{true}_as_{pred}"] = float(matrix[i, j])
        flat["threshold"] = self.threshold
        if self.threshold_evidence is not None:
            flat["threshold_evidence"] = self.threshold_evidence
        if self.types is not None:
            flat |= self.types.metrics(prefix)
        return flat


def evaluation_from_scores(
    labels: np.ndarray,
    scores: np.ndarray,
    frame: pd.DataFrame,
    threshold: float,
    target_recall: float | None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    evidence: float | None = None,
) -> Evaluation:
    """Figures of (labels, scores) at ``threshold`` and 0.5; with the validation split's
    (labels, scores), also the trade-off table of operating points. ``evidence``: what
    :func:`~qi.evaluation.operating_point.threshold_evidence` said, where it chose."""
    predicted = decide(scores, threshold)
    report = classification_report(
        labels,
        predicted,
        labels=[0, 1],
        target_names=list(LABELS),
        output_dict=True,
        zero_division=0,
    )
    text = classification_report(
        labels, predicted, labels=[0, 1], target_names=list(LABELS), digits=4, zero_division=0
    )
    defect_types = frame.loc[frame["label"] == 1, "defect_type"]
    # a lone "defect" folder names no types: nothing to break down
    by_type = None
    if (defect_types != "defect").any():
        by_type = recall_by_defect_type(frame, scores, threshold)
    return Evaluation(
        threshold=threshold,
        target_recall=target_recall,
        labels=labels,
        scores=scores,
        frame=frame.reset_index(drop=True),
        metrics=binary_metrics(labels, scores, threshold),
        metrics_at_half=binary_metrics(labels, scores, 0.5),
        report=report,
        report_text=text,
        by_defect_type=by_type,
        tradeoff=None if validation is None else tradeoff(*validation, labels, scores, evidence),
        val_false_alarms=None if validation is None else rates(*validation, threshold)[1],
        threshold_evidence=evidence,
    )
