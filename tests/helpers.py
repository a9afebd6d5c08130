"""Small image folders in each supported layout, written with OpenCV."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def write_image(path: Path, seed: int, size=(40, 52), channels: int = 1, dtype=np.uint8) -> Path:
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    shape = size if channels == 1 else (*size, channels)
    image = rng.integers(0, top, shape, dtype=dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path
    return path


def make_class_folders(root: Path, classes: dict[str, int], ext: str = ".png") -> Path:
    seed = 0
    for name, count in classes.items():
        for i in range(count):
            seed += 1
            write_image(root / name / f"{name}_{i}{ext}", seed)
    return root


def make_mvtec(
    root: Path, n_train_good=10, n_test_good=4, defects=("crack", "hole"), n_defect=5
) -> Path:
    make_class_folders(root / "train", {"good": n_train_good})
    make_class_folders(root / "test", {"good": n_test_good, **{d: n_defect for d in defects}})
    for d in defects:  # masks must be ignored
        make_class_folders(root / "ground_truth", {d: 2})
    return root


def peaks_in_defect_boxes(
    root: Path, data, maps: np.ndarray, margin: float
) -> tuple[int, int, int]:
    """How often a map's maximum lies in the defect box the synth recorded for its image.

    ``maps`` are one per test image of ``data`` (a prepared synth folder at ``root``). Returns
    (defective test images, peaks inside their own box, peaks inside the next image's box:
    what chance alone would give), each box dilated by ``margin`` pixels.
    """
    from qi.data import synth
    from qi.heatmaps import peak

    with open(root / synth.MANIFEST) as manifest:
        regions = {row["path"]: row for row in csv.DictReader(manifest)}
    boxes, peaks = [], []
    for path, heatmap in zip(data.split_frame("test")["image_path"], maps, strict=True):
        row = regions[str(Path(path).relative_to(root))]
        if row["label"] == "defective":
            boxes.append([int(row[k]) for k in synth.REGION_COLUMNS])
            peaks.append(peak(heatmap))

    def inside(box: list[int], point: tuple[int, int]) -> bool:
        x0, y0, x1, y1 = box
        x, y = point
        return x0 - margin <= x <= x1 + margin and y0 - margin <= y <= y1 + margin

    hits = sum(inside(b, p) for b, p in zip(boxes, peaks, strict=True))
    shifted = boxes[1:] + boxes[:1]
    chance = sum(inside(b, p) for b, p in zip(shifted, peaks, strict=True))
    return len(boxes), hits, chance
