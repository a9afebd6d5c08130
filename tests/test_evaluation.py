import numpy as np
import pandas as pd
import pytest

from qi.evaluation import binary_metrics, choose_threshold, evaluation_from_scores
from qi.evaluation_report import plot_confusion, plot_curves, plot_defect_recall, summary_markdown


def test_threshold_reaches_the_target_recall_with_fewest_alarms():
    labels = np.array([1] * 10 + [0] * 10)
    scores = np.concatenate([np.linspace(0.1, 1.0, 10), np.linspace(0.0, 0.45, 10)])
    # 9 of 10 defects must be caught: the 9th highest defect score is 0.2
    assert choose_threshold(labels, scores, 0.9) == pytest.approx(0.2)
    # all of them: the lowest defect score
    assert choose_threshold(labels, scores, 1.0) == pytest.approx(0.1)
    # half of them: 0.6 (scores 1.0, 0.9, 0.8, 0.7, 0.6 are caught)
    assert choose_threshold(labels, scores, 0.5) == pytest.approx(0.6)
    for target in (0.5, 0.9, 1.0):
        threshold = choose_threshold(labels, scores, target)
        assert binary_metrics(labels, scores, threshold)["defect_recall"] >= target
        # any higher threshold misses the target
        assert binary_metrics(labels, scores, threshold + 1e-6)["defect_recall"] < target
    assert choose_threshold(np.zeros(4), np.ones(4), 0.99) == 0.5  # no defects: default
    with pytest.raises(ValueError):
        choose_threshold(labels, scores, 0)


def _evaluation(threshold=0.5):
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.7, 0.9, 0.8, 0.3, 0.95])
    frame = pd.DataFrame(
        {
            "image_path": [f"/x/{i}.png" for i in range(7)],
            "label": labels,
            "defect_type": ["none"] * 3 + ["crack", "crack", "pin_holes", "crack"],
        }
    )
    return evaluation_from_scores(labels, scores, frame, threshold, target_recall=0.9)


def test_metrics_confusion_and_defect_types():
    ev = _evaluation()
    assert ev.metrics["defect_recall"] == pytest.approx(0.75)
    assert ev.metrics["acc"] == pytest.approx(5 / 7)
    assert ev.confusion().tolist() == [[2, 1], [1, 3]]
    flat = ev.flat_metrics()
    assert flat["test/confusion_defective_as_ok"] == 1 and flat["threshold"] == 0.5
    assert "test_at_0.5/f1" in flat
    table = ev.by_defect_type.set_index("defect_type")
    assert table.loc["pin_holes", "recall"] == 0 and table.loc["crack", "recall"] == 1
    assert ev.report["defective"]["recall"] == pytest.approx(0.75)
    lower = _evaluation(threshold=0.25)
    assert lower.metrics["defect_recall"] == 1.0 and lower.metrics_at_half == ev.metrics


def test_plots_and_summary(tmp_path):
    ev = _evaluation()
    for plot, name in (
        (plot_confusion, "cm.png"),
        (plot_curves, "curves.png"),
        (plot_defect_recall, "types.png"),
    ):
        path = plot(ev, tmp_path / name)
        assert path.stat().st_size > 10_000  # a real picture, not an empty canvas
    text = summary_markdown(ev, ["cm.png"], "Title")
    assert "| defect_recall | 0.7500 |" in text and "pin_holes" in text and "![cm](cm.png)" in text
