"""Which defect types a model can learn from a data set, and each image's type target.

A type is learned when its training split holds :data:`MIN_TYPE_IMAGES` defective images or
more, and at least :data:`MIN_TYPES` types qualify: with fewer images a type's recall would
be measured on two or three test images, and one type alone is no choice to make. Defective
images of a type that does not qualify still teach "defective"; their type target is
:data:`NO_TYPE`, so the type head neither learns nor is scored on them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_TYPE_IMAGES = 8
MIN_TYPES = 2
NO_TYPE = -1
GOOD_TYPE = "none"  # discovery's defect_type of a good image


def learnable_types(frame: pd.DataFrame) -> tuple[str, ...]:
    """The defect types the type head learns, sorted (empty: too few types or images)."""
    defective = frame[(frame["split"] == "train") & (frame["label"] == 1)]
    counts = defective["defect_type"].value_counts()
    kept = sorted(t for t, n in counts.items() if n >= MIN_TYPE_IMAGES and t not in ("", GOOD_TYPE))
    return tuple(kept) if len(kept) >= MIN_TYPES else ()


def type_targets(frame: pd.DataFrame, types: tuple[str, ...]) -> np.ndarray:
    """Index of each row's defect type in ``types``; :data:`NO_TYPE` for good images and for
    types not learned."""
    index = {t: i for i, t in enumerate(types)}
    return np.array(
        [
            index.get(t, NO_TYPE) if label == 1 else NO_TYPE
            for t, label in zip(frame["defect_type"], frame["label"], strict=True)
        ],
        dtype=np.int64,
    )


def types_not_learned(frame: pd.DataFrame, types: tuple[str, ...]) -> dict[str, int]:
    """Defect types in the training split that the type head does not learn, with counts."""
    defective = frame[(frame["split"] == "train") & (frame["label"] == 1)]
    counts = defective["defect_type"].value_counts()
    return {t: int(n) for t, n in counts.items() if t not in types and t not in ("", GOOD_TYPE)}


def types_warning(frame: pd.DataFrame, types: tuple[str, ...]) -> str | None:
    """One line when the data names defect types the model will not learn (too few training
    images), so a user sees why a type never comes back; None when there is nothing to say
    (every named type learned, or the data names one kind of defect only)."""
    short = types_not_learned(frame, types)
    if not short or len(short) + len(types) < MIN_TYPES:
        return None
    listed = ", ".join(f"{t} ({n})" for t, n in sorted(short.items(), key=lambda kv: -kv[1]))
    rule = f"{MIN_TYPE_IMAGES}+ training images each"
    if types:
        return (
            f"defect types with too few training images (needs {rule}) are learned as "
            f"defective but never named: {listed}"
        )
    return (
        f"no defect types learned (needs {MIN_TYPES}+ types with {rule}): {listed}; the model "
        "says whether a part is defective, not which defect"
    )
