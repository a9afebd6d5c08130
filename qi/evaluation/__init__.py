"""Held-out evaluation of a model: metrics, the operating point, plots and the report.

- :mod:`qi.evaluation.metrics`: figures from labels and scores (pure);
- :mod:`qi.evaluation.scoring`: a network's scores on a split, then those figures;
- :mod:`qi.evaluation.operating_point`: the threshold, chosen on validation;
- :mod:`qi.evaluation.report`: plots, ``summary.md`` and logging them on a run;
- :mod:`qi.evaluation.run`: ``qi evaluate``, a logged model scored as its own run.
"""

from qi.evaluation.metrics import (
    PROMOTION_METRICS,
    Evaluation,
    binary_metrics,
    evaluation_from_scores,
    recall_by_defect_type,
)
from qi.evaluation.operating_point import DEFAULT_THRESHOLD, choose_threshold

__all__ = [
    "DEFAULT_THRESHOLD",
    "PROMOTION_METRICS",
    "Evaluation",
    "binary_metrics",
    "choose_threshold",
    "evaluation_from_scores",
    "recall_by_defect_type",
]
