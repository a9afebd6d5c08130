"""Train/val/test splits that stay put while a folder grows, and seeded subsamples.

**A file keeps its split for life.** Each file draws a number in [0, 1) from a hash of the
seed and its path relative to the data folder (:func:`file_draws`); the split is where that
number falls (test below the test fraction, val in the next band, train above). Adding,
removing or failing to read *other* files never moves it, on any machine, and moving the
whole folder does not either. The draw is independent of the class, so every class and
defect type is split in the chosen proportions in expectation (the binomial spread: about
a standard deviation of 3.2 of 12 expected test images in 80, 1.1 points of a 15% split
of 1,000). Where a
class would end up absent from a split qi drew, its train file with the lowest draw joins
that split, so small data still validates and tests every class.

(A rank-based exact split - scikit-learn's stratified ``train_test_split`` - was what qi did
before: one added image could reshuffle every split, and a champion be scored on files it
trained on.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from qi.data.discovery import DataLayoutError

MIN_IMAGES_PER_CLASS = 4
MIN_GOOD_IMAGES = 10  # a detector learns good images: fewer describe no line


def file_draws(
    paths: pd.Series, root: str | Path | None, seed: int, salt: str = "split"
) -> np.ndarray:
    """A number in [0, 1) per file from sha256 of (seed, salt, path relative to ``root``):
    the same file gets the same number whatever else is in the folder."""
    base = Path(root) if root is not None else None

    def draw(path: str) -> float:
        name = Path(path)
        if base is not None and name.is_relative_to(base):
            name = name.relative_to(base)
        digest = hashlib.sha256(f"{seed}\0{salt}\0{name.as_posix()}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    return np.fromiter((draw(p) for p in paths), float, count=len(paths))


def every_class_in(
    frame: pd.DataFrame, draws: np.ndarray, split: str, source: str = "train"
) -> None:
    """Where ``split`` lacks a class that ``source`` has 2+ images of, the ``source`` image
    of that class with the lowest draw joins it (in place)."""
    for label in frame["label"].unique():
        of_class = frame["label"] == label
        if (of_class & (frame["split"] == split)).any():
            continue
        candidates = np.flatnonzero((of_class & (frame["split"] == source)).to_numpy())
        if len(candidates) >= 2:
            frame.loc[frame.index[candidates[np.argmin(draws[candidates])]], "split"] = split


def check_classes(frame: pd.DataFrame, where: str, good_only: bool = False) -> None:
    """Fail before any training when a class is missing or too small to split; with
    ``good_only`` (a method that may learn from good images) data a classifier could not use
    is accepted when it holds at least :data:`MIN_GOOD_IMAGES` good images."""
    counts = frame["label"].value_counts()
    good, defective = int(counts.get(0, 0)), int(counts.get(1, 0))
    enough_for_a_classifier = min(good, defective) >= MIN_IMAGES_PER_CLASS
    if good_only and not enough_for_a_classifier:
        if good < MIN_GOOD_IMAGES:
            raise DataLayoutError(
                f"{where} has {good} good image(s); a detector of good images needs at least "
                f"{MIN_GOOD_IMAGES}: add good images or check --ok-class"
            )
        return
    for n, name in ((good, "good"), (defective, "defective")):
        if n < MIN_IMAGES_PER_CLASS:
            hint = " or learn from good images only with qi train --method anomaly"
            hint = hint if name == "defective" else ""
            raise DataLayoutError(
                f"{where} has {n} {name} image(s); a classifier needs at least "
                f"{MIN_IMAGES_PER_CLASS} of each class to train and validate: add images, "
                f"check --ok-class{hint}"
            )


def assign_splits(
    frame: pd.DataFrame,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    root: str | Path | None = None,
) -> pd.DataFrame:
    """Fill empty ``split`` cells from each file's draw (see the module docstring): test
    first (if the layout had none), then val (a share of the whole set), the rest train."""
    frame = frame.sort_values("image_path").reset_index(drop=True)
    frame["split"] = frame["split"].fillna("")
    free = (frame["split"] == "").to_numpy()
    draws = file_draws(frame["image_path"], root, seed)
    has_test = (frame["split"] == "test").any()
    has_val = (frame["split"] == "val").any()
    test_share = 0.0 if has_test else test_fraction
    # val_fraction is of the whole set; at most half of what the test leaves
    val_share = 0.0 if has_val else min(val_fraction, 0.5 * (1 - test_share))
    split = np.where(
        draws < test_share, "test", np.where(draws < test_share + val_share, "val", "train")
    )
    frame.loc[free, "split"] = split[free]
    for name, drawn in (
        ("test", not has_test and test_fraction > 0),
        ("val", not has_val and val_fraction > 0),
    ):
        if drawn:
            every_class_in(frame, draws, name)
    return frame


def subsample(frame: pd.DataFrame, max_images: int | None, seed: int, root=None) -> pd.DataFrame:
    """At most ``max_images`` rows for quick searches: the files with the lowest draws (every
    class in proportion, in expectation). A file added to the folder enters only by
    displacing the kept file with the highest draw; nothing else changes."""
    if not max_images or len(frame) <= max_images:
        return frame
    frame = frame.sort_values("image_path").reset_index(drop=True)
    draws = file_draws(frame["image_path"], root, seed, salt="subsample")
    kept = np.sort(np.argsort(draws, kind="stable")[:max_images])
    return frame.iloc[kept].reset_index(drop=True)
