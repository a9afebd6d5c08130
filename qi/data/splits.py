"""Seeded, stratified train/val/test splits and subsamples.

Stratification is by defect type where every type has enough images, so that each kind of
defect appears in every split; otherwise by the binary label. The same seed and file list give
the same split on every machine: rows are sorted by path before any random draw.
"""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

from qi.data.discovery import DataLayoutError

MIN_IMAGES_PER_CLASS = 4
MIN_GOOD_IMAGES = 10  # a detector learns good images: fewer describe no line


def _strata(frame: pd.DataFrame, pieces: int) -> pd.Series:
    """Defect type if every type can be split ``pieces`` ways, else the binary label."""
    types = frame["defect_type"]
    if types.value_counts().min() >= pieces:
        return types
    return frame["label"]


def _split_off(
    frame: pd.DataFrame, fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if fraction <= 0 or len(frame) < 2:
        return frame, frame.iloc[0:0]
    strata = _strata(frame, pieces=2)
    can_stratify = strata.value_counts().min() >= 2
    keep, taken = train_test_split(
        frame, test_size=fraction, random_state=seed, stratify=strata if can_stratify else None
    )
    return keep, taken


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
    frame: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.DataFrame:
    """Fill empty ``split`` cells: test first (if the layout had none), then val from train."""
    frame = frame.sort_values("image_path").reset_index(drop=True)
    frame["split"] = frame["split"].fillna("")
    fixed = frame[frame["split"] != ""]
    free = frame[frame["split"] == ""]
    parts = [fixed]
    if not (fixed["split"] == "test").any():
        free, test = _split_off(free, test_fraction, seed)
        parts.append(test.assign(split="test"))
    if not (fixed["split"] == "val").any():
        # val_fraction is of the whole set, so rescale it to what is left
        share = val_fraction / max(
            1e-9, 1 - (0 if (fixed["split"] == "test").any() else test_fraction)
        )
        free, val = _split_off(free, min(share, 0.5), seed + 1)
        parts.append(val.assign(split="val"))
    parts.append(free.assign(split="train"))
    return pd.concat(parts).sort_values("image_path").reset_index(drop=True)


def subsample(frame: pd.DataFrame, max_images: int | None, seed: int) -> pd.DataFrame:
    """At most ``max_images`` rows, stratified, for quick searches."""
    if not max_images or len(frame) <= max_images:
        return frame
    frame = frame.sort_values("image_path").reset_index(drop=True)
    strata = _strata(frame, pieces=2)
    if strata.value_counts().min() < 2:
        strata = None
    kept, _ = train_test_split(frame, train_size=max_images, random_state=seed, stratify=strata)
    return kept.sort_values("image_path").reset_index(drop=True)
