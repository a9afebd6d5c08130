"""Small image folders in each supported layout, written with OpenCV."""

from __future__ import annotations

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
