"""Fitting the good-only detector: splits where defects only judge, the memory bank, the
operating point.

- **Defects judge, never train.** :func:`detector_data` keeps the classifier's test split (so
  the two methods are compared on the same images) and moves every defective image the split
  put in train to validation; an MVTec AD category keeps its ``train/good`` for the bank and
  its test folder is split in halves into validation and test.
- **The bank** holds patches of good training images only (:mod:`qi.models.memory_bank`).
- **The threshold.** With at least :data:`MIN_VALIDATION_DEFECTS` defects in validation it is
  chosen there as for classifiers (fewest balanced errors, or ``--target-recall``). With fewer
  it is the ``1 - max_false_alarm_rate`` quantile of the held-out good images' scores, and
  the run says that no defect recall was measured. Either way the raw score at the threshold
  becomes the detector's ``centre``, so its defect probability is 0.5 there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from qi.config import RunConfig
from qi.data.datamodule import PreparedData
from qi.data.discovery import DataLayoutError
from qi.data.splits import every_class_in, file_draws
from qi.evaluation.metrics import binary_metrics
from qi.evaluation.operating_point import choose_threshold
from qi.fit import FitResult
from qi.inference import map_batches
from qi.models.memory_bank import MAX_CANDIDATES, bank_size, greedy_coreset, sample_patches
from qi.models.patchcore import PatchCoreNet, build_detector

log = logging.getLogger(__name__)

MIN_VALIDATION_DEFECTS = 5
BATCH = 16


class NoDefectsToJudge(DataLayoutError):
    """A setting that needs defects in validation, asked of data without them (a data
    problem the user fixes: the CLI shows it as one line)."""


def detector_data(data: PreparedData, seed: int) -> PreparedData:
    """``data`` with the detector's splits (see the module docstring)."""
    frame = data.frame.copy()
    if data.layout == "mvtec":
        train_root = Path(data.root) / "train"
        in_train = frame["image_path"].map(lambda p: Path(p).is_relative_to(train_root))
        frame.loc[in_train, "split"] = "train"
        # each held-out file's own draw halves the test folder: stable as the folder grows
        draws = file_draws(frame["image_path"], data.root, seed, salt="detector")
        frame.loc[~in_train, "split"] = np.where(draws[~in_train.to_numpy()] < 0.5, "val", "test")
        for name, other in (("val", "test"), ("test", "val")):
            every_class_in(frame, draws, name, source=other)
    else:
        frame.loc[(frame["split"] == "train") & (frame["label"] == 1), "split"] = "val"
    return replace(data, frame=frame)


def validation_defects(data: PreparedData) -> int:
    _, labels = data.split("val")
    return int(labels.sum())


def raw_scores(net: PatchCoreNet, images: np.ndarray) -> np.ndarray:
    return map_batches(net.raw_scores, images, BATCH, net.memory_bank.device)


def fitting_device() -> torch.device:
    """Where the bank is built and validation scored: a GPU when there is one (the features,
    the coreset's distance updates and the kNN are all matrix products)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class DetectorSummary:
    """What a fitted detector kept and what its threshold rests on: logged as the run's
    metrics, printed by ``qi train``."""

    bank_patches: int
    candidate_patches: int
    bank_mb: float
    validation_defects: int
    recall_measured: bool  # False: the threshold rests on good images only

    def metrics(self) -> dict[str, float]:
        return {name: float(value) for name, value in asdict(self).items()}


@torch.inference_mode()
def memory_bank(
    net: PatchCoreNet, images: np.ndarray, config: RunConfig
) -> tuple[torch.Tensor, int]:
    """The coreset of the good images' patches, and how many patches there were."""
    generator = torch.Generator().manual_seed(config.train.seed)
    device = net.memory_bank.device
    quota, total, chunks = None, 0, []
    for start in range(0, len(images), BATCH):
        batch = torch.from_numpy(images[start : start + BATCH]).permute(0, 3, 1, 2)
        features = net.patch_features(batch.to(device)).float().cpu()
        if quota is None:
            per_image = features.shape[2] * features.shape[3]
            quota = max(1, min(per_image, MAX_CANDIDATES // max(len(images), 1)))
        total += features.shape[0] * features.shape[2] * features.shape[3]
        chunks.append(sample_patches(features, quota, generator).half())
    candidates = torch.cat(chunks)
    detector = config.detector
    size = bank_size(total, detector.coreset_ratio, detector.max_bank_patches, len(candidates))
    chosen = greedy_coreset(candidates.to(device), size, config.train.seed).cpu()
    return candidates[chosen].clone(), total


def fit_detector(config: RunConfig, data: PreparedData) -> tuple[FitResult, DetectorSummary]:
    """Build the bank from the good training images, set the operating point on validation.

    ``data`` must already hold the detector's splits (:func:`detector_data`).
    """
    started = time.perf_counter()
    defects = validation_defects(data)
    target = config.evaluation.target_recall
    if target is not None and defects < MIN_VALIDATION_DEFECTS:
        raise NoDefectsToJudge(
            f"--target-recall {target} needs defective images in validation; it has {defects}: "
            "add labelled defects or leave --target-recall out"
        )
    net = build_detector(config.model, config.detector, data.preprocess.channels)
    net.to(fitting_device())
    images, labels = data.split("train")
    good = images[labels == 0]
    bank, patches = memory_bank(net, good, config)
    net.memory_bank = bank.to(net.memory_bank.device)
    val_images, val_labels = data.split("val")
    val_raw = raw_scores(net, val_images)
    good_scores = val_raw[val_labels == 0]
    if good_scores.size == 0:
        good_scores = raw_scores(net, good[: min(len(good), 64)])  # seen, so optimistic
    net.to("cpu")
    quantile = float(np.quantile(good_scores, 1 - config.detector.max_false_alarm_rate))
    spread = float(np.std(good_scores)) if good_scores.size > 1 else 0.0
    scale = spread if spread > 1e-6 else max(abs(quantile) * 0.05, 1e-3)
    net.centre.fill_(quantile)
    net.scale.fill_(scale)
    measured = defects >= MIN_VALIDATION_DEFECTS
    if measured:
        probabilities = net.calibrated(torch.from_numpy(val_raw)).numpy()
        # its 0.5 is a quantile of good scores, not a trained boundary: nothing to defend
        threshold = choose_threshold(val_labels, probabilities, target, require_evidence=False)
        logit = math.log(max(threshold, 1e-7) / max(1 - threshold, 1e-7))
        net.centre.fill_(quantile + scale * logit)
    probabilities = net.calibrated(torch.from_numpy(val_raw)).numpy()
    metrics = binary_metrics(val_labels, probabilities, 0.5) if measured else {}
    val_metrics = {f"val/{k}": float(v) for k, v in metrics.items()}
    val_metrics["val/false_alarm_rate"] = float(np.mean(probabilities[val_labels == 0] >= 0.5))
    seconds = time.perf_counter() - started
    log.info(
        "memory bank: %d of %d good patches (%.1f MB fp16), %d validation defects%s",
        len(bank),
        patches,
        net.bank_megabytes,
        defects,
        "" if measured else ": threshold from good images only, no defect recall measured",
    )
    summary = DetectorSummary(
        bank_patches=len(bank),
        candidate_patches=patches,
        bank_mb=net.bank_megabytes,
        validation_defects=defects,
        recall_measured=measured,
    )
    result = FitResult(
        net=net,
        best_epoch=0,
        epochs_run=1,
        val_metrics=val_metrics,
        seconds=seconds,
        images_per_second=len(good) / max(seconds, 1e-9),
    )
    return result, summary
