"""Where a detector looks, measured: pixel ROC AUC of its anomaly maps against defect masks.

MVTec AD ships a mask per defective test image (``ground_truth/<type>/<name>_mask.png``;
good images have none: every pixel is good). The image-level ROC AUC says whether a part is
flagged, the pixel-level one whether the map points at the defect, which is what an
inspector reads off the heatmap. Masks are resized to the model's input exactly as the images
were (a plain resize, nearest neighbour so a mask stays binary).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_auc_score

from qi.data.datamodule import PreparedData
from qi.evaluation.metrics import Evaluation
from qi.inference import map_batches
from qi.models.patchcore import PatchCoreNet

log = logging.getLogger(__name__)

MASK_SUFFIX = "_mask"
BATCH = 16


def mask_path(image_path: str | Path, root: str | Path) -> Path:
    """MVTec AD's mask of a test image: ``test/<type>/<name>.png`` ->
    ``ground_truth/<type>/<name>_mask.png``."""
    relative = Path(image_path).relative_to(Path(root) / "test")
    return Path(root) / "ground_truth" / relative.parent / f"{relative.stem}{MASK_SUFFIX}.png"


def known_masks(data: PreparedData) -> tuple[np.ndarray, np.ndarray] | None:
    """(positions in the test split, ``(N, size, size)`` bool masks) of the test images whose
    truth is known: every good one (no defect pixel) and each defective one with a mask file.
    None when the layout has no masks or they mark no defect pixel."""
    if data.layout != "mvtec":
        return None
    size = data.preprocess.image_size
    frame = data.split_frame("test")
    chosen, masks, missing, defect_pixels = [], [], 0, False
    for position, (path, label) in enumerate(zip(frame["image_path"], frame["label"], strict=True)):
        if label == 0:
            chosen.append(position)
            masks.append(np.zeros((size, size), bool))
            continue
        file = mask_path(path, data.root)
        mask = cv2.imread(str(file), cv2.IMREAD_GRAYSCALE) if file.is_file() else None
        if mask is None:
            missing += 1
            continue
        chosen.append(position)
        masks.append(cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST) > 127)
        defect_pixels = defect_pixels or bool(masks[-1].any())
    if missing:
        log.warning("pixel AUROC: %d defective test image(s) have no readable mask", missing)
    if not defect_pixels or all(m.all() for m in masks):
        return None  # nothing to rank: no defect pixel (or no good one) anywhere
    return np.asarray(chosen), np.stack(masks)


def pixel_auroc(net: PatchCoreNet, data: PreparedData) -> tuple[float, int] | None:
    """Pixel ROC AUC of ``net``'s anomaly maps on the test images with known masks, and how
    many images that was; None where the data has no masks."""
    known = known_masks(data)
    if known is None:
        return None
    positions, masks = known
    images, _ = data.split("test")
    maps = map_batches(net.anomaly_maps, images[positions], BATCH)
    return float(roc_auc_score(masks.ravel(), maps.ravel())), len(positions)


def add_pixel_auroc(evaluation: Evaluation, net: PatchCoreNet, data: PreparedData) -> None:
    """``test/pixel_auroc`` (and the images it rests on) among the evaluation's metrics, where
    the data has masks: logged, reported and printed with the image-level figures."""
    measured = pixel_auroc(net, data)
    if measured is None:
        return
    evaluation.metrics["pixel_auroc"], evaluation.metrics["pixel_auroc_images"] = measured
    log.info("pixel ROC AUC %.4f on %d test images with masks", *measured)
