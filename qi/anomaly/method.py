"""Which method learns: the rule behind ``--method auto``, a pure function of the data.

A classifier needs defects to learn from: with fewer than :data:`MIN_CLASSIFIER_DEFECTS`
defective training images (about 14 for training after validation takes its share) it
learns the handful it saw and little else, and its validation figures rest on two or three
images. A layout whose training folder is good-only (MVTec AD) says the same by design.
"""

from __future__ import annotations

import pandas as pd

MIN_CLASSIFIER_DEFECTS = 20


def choose_method(requested: str, frame: pd.DataFrame, layout: str) -> tuple[str, str]:
    """(method, why) for the user's ``requested`` method on a split table."""
    defects = int(((frame["split"] != "test") & (frame["label"] == 1)).sum())
    if requested != "auto":
        return requested, f"--method {requested}"
    if layout == "mvtec":
        return "anomaly", "auto: the MVTec AD layout's training folder holds good images only"
    if defects < MIN_CLASSIFIER_DEFECTS:
        return "anomaly", (
            f"auto: {defects} defective image(s) outside test, fewer than the "
            f"{MIN_CLASSIFIER_DEFECTS} a classifier needs"
        )
    return "classifier", f"auto: {defects} defective images outside test to learn from"
