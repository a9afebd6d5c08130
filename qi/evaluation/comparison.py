"""Two models on the same test images: a paired bootstrap of their difference.

"Candidate beats champion" on a few hundred images flips on noise: F1 on 300 images moves by
a few points between resamples. qi resamples the shared images with replacement (the same
draw for both models, so what they got right and wrong together cancels) and reads the
difference's interval. Pure numpy and scikit-learn: the registry decides with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qi.evaluation.metrics import metric_value

ROUNDS = 1000
LEVEL = 0.90  # two-sided; its lower end is a one-sided 95% bound


@dataclass(frozen=True)
class Comparison:
    metric: str
    images: int
    candidate: float
    champion: float
    candidate_interval: tuple[float, float]
    champion_interval: tuple[float, float]
    difference_interval: tuple[float, float]  # candidate - champion


def paired_bootstrap(
    labels: np.ndarray,
    candidate: tuple[np.ndarray, float],
    champion: tuple[np.ndarray, float],
    metric: str,
    rounds: int = ROUNDS,
    seed: int = 0,
) -> Comparison:
    """Each model's ``metric`` (scores, threshold) on the images and over ``rounds`` paired
    resamples; resamples with one class only (where F1 or AUC are undefined) are drawn again."""
    if len(np.unique(labels)) < 2:
        raise ValueError("a comparison needs good and defective images")
    rng = np.random.default_rng(seed)
    n = len(labels)
    both, ours, theirs = [], [], []
    while len(both) < rounds:
        pick = rng.integers(0, n, n)
        if len(np.unique(labels[pick])) < 2:
            continue
        a = metric_value(metric, labels[pick], candidate[0][pick], candidate[1])
        b = metric_value(metric, labels[pick], champion[0][pick], champion[1])
        ours.append(a)
        theirs.append(b)
        both.append(a - b)
    tail = (1 - LEVEL) / 2 * 100

    def interval(values: list[float]) -> tuple[float, float]:
        low, high = np.nanpercentile(values, [tail, 100 - tail])
        return float(low), float(high)

    return Comparison(
        metric=metric,
        images=n,
        candidate=metric_value(metric, labels, *candidate),
        champion=metric_value(metric, labels, *champion),
        candidate_interval=interval(ours),
        champion_interval=interval(theirs),
        difference_interval=interval(both),
    )
