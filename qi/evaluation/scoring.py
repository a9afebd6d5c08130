"""Scores of a network on a split: what the evaluation measures and where its threshold and
test-time views are chosen. The one module of :mod:`qi.evaluation` that runs a network."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import log_loss

from qi.data.datamodule import PreparedData
from qi.data.embeddings import embeddings
from qi.evaluation.metrics import Evaluation, evaluation_from_scores
from qi.evaluation.operating_point import (
    DEFAULT_THRESHOLD,
    EVIDENCE_SHARE,
    balanced_threshold,
    choose_threshold,
    no_target,
    threshold_evidence,
)
from qi.evaluation.types import evaluate_types
from qi.inference import defect_probabilities, probabilities_and_types
from qi.models import InspectionNet
from qi.models.parts import HeadOnViews


def validation_probabilities(net: InspectionNet, images: np.ndarray) -> np.ndarray:
    """Defect probabilities of ``images`` as ``net`` answers them; a head on a frozen
    pretrained encoder reads the feature cache its fit filled (seconds instead of an encoder
    pass per view), the same features the whole network computes."""
    if getattr(net, "finetune", "all") != "head" or not getattr(net, "pretrained", False):
        return defect_probabilities(net, images)
    features = embeddings(net, images, views=net.test_time_views, progress=False)
    with torch.inference_mode():
        logits = HeadOnViews(net.head.eval())(torch.from_numpy(features).permute(1, 0, 2))
    return torch.sigmoid(logits).numpy()


def score_split(
    net: InspectionNet, data: PreparedData, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, defect probabilities) of every image in ``split``."""
    images, labels = data.split(split)
    return labels, defect_probabilities(net, images)


def evaluate(
    net: InspectionNet,
    data: PreparedData,
    target_recall: float | None,
    split: str = "test",
    threshold: float | None = None,
) -> Evaluation:
    """Choose the threshold on validation (unless the model comes with its own: a detector's
    is 0.5 by construction), then measure ``split`` at it and at 0.5. Without a target
    recall, 0.5 stays unless the validation evidence for the balanced threshold is clear
    (:func:`~qi.evaluation.operating_point.threshold_evidence`).

    Validation is scored as the study's trials were (a frozen encoder's head reads the
    feature cache: the ELPV default study's best trial, 130 validation cells x 8 views,
    10.8 s -> 0.1 s); ``split`` always through the whole network, as it serves."""
    val_images, val_labels = data.split("val")
    val_scores = validation_probabilities(net, val_images)
    evidence = None
    if threshold is None and no_target(target_recall):
        evidence = threshold_evidence(val_labels, val_scores)
        threshold = (
            balanced_threshold(val_labels, val_scores)
            if evidence >= EVIDENCE_SHARE
            else DEFAULT_THRESHOLD
        )
    elif threshold is None:
        threshold = choose_threshold(val_labels, val_scores, target_recall)
    images, labels = data.split(split)
    scores, type_probabilities = probabilities_and_types(net, images)
    frame = data.split_frame(split)
    evaluation = evaluation_from_scores(
        labels,
        scores,
        frame,
        threshold,
        target_recall,
        validation=(val_labels, val_scores),
        evidence=evidence,
    )
    if net.defect_types:
        evaluation.types = evaluate_types(
            frame, evaluation.predicted, type_probabilities, net.defect_types
        )
    return evaluation


def views_on_validation(net, images: np.ndarray, labels: np.ndarray, views: int = 8) -> int:
    """1 or ``views``: whether averaging each validation image's flips and rotations lowers
    the validation log loss of ``net`` (a threshold-free test, chosen where the threshold is).

    Measured on the castings (CNN, 15 epochs): 8 views lifted the test ROC AUC from 0.998 to
    1.000; on the ELPV cells a frozen EfficientNet-Lite0 head gained 3 points of accuracy.
    The price is ``views`` forward passes per image in production.
    """
    if len(np.unique(labels)) < 2:
        return 1
    kept = net.test_time_views
    losses = {}
    try:
        for candidate in (1, views):
            net.test_time_views = candidate
            scores = np.clip(defect_probabilities(net, images), 1e-7, 1 - 1e-7)
            losses[candidate] = log_loss(labels, scores, labels=[0, 1])
    finally:
        net.test_time_views = kept
    return views if losses[views] < losses[1] else 1
