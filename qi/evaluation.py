"""Held-out figures of a trained network, computed with scikit-learn from its scores."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from qi.data.datamodule import PreparedData
from qi.models import InspectionNet
from qi.serving import defect_probabilities


def score_split(
    net: InspectionNet, data: PreparedData, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, defect probabilities) of every image in ``split``."""
    images, labels = data.split(split)
    return labels, defect_probabilities(net, images)


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, defect recall, F1 at ``threshold``; ROC AUC and AP over scores."""
    predicted = (scores >= threshold).astype(int)
    both_classes = len(np.unique(labels)) == 2
    return {
        "acc": accuracy_score(labels, predicted),
        "precision": precision_score(labels, predicted, zero_division=0),
        "defect_recall": recall_score(labels, predicted, zero_division=0),
        "f1": f1_score(labels, predicted, zero_division=0),
        "auroc": roc_auc_score(labels, scores) if both_classes else float("nan"),
        "average_precision": average_precision_score(labels, scores)
        if both_classes
        else float("nan"),
    }
