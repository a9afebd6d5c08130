import numpy as np
import pandas as pd
import pytest

from qi.evaluation import binary_metrics, choose_threshold, evaluation_from_scores
from qi.evaluation.report import plot_confusion, plot_curves, plot_defect_recall, summary_markdown


def _logit_midpoint(a, b):
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    return 1 / (1 + np.exp(-(logit(a) + logit(b)) / 2))


def test_threshold_reaches_the_target_recall_with_fewest_alarms_in_the_middle_of_the_gap():
    labels = np.array([1] * 10 + [0] * 10)
    scores = np.concatenate([np.linspace(0.1, 1.0, 10), np.linspace(0.0, 0.45, 10)])
    # 9 of 10 defects must be caught: the 9th highest defect score is 0.2, the next lower
    # score is an ok image's 0.15
    assert choose_threshold(labels, scores, 0.9) == pytest.approx(_logit_midpoint(0.2, 0.15))
    # all of them: the lowest defect score 0.1, next lower 0.05
    assert choose_threshold(labels, scores, 1.0) == pytest.approx(_logit_midpoint(0.1, 0.05))
    # half of them: 0.5 already catches 6 (0.5 ... 1.0); the threshold never rises above it
    assert choose_threshold(labels, scores, 0.5) == 0.5
    for target in (0.5, 0.9, 1.0):
        threshold = choose_threshold(labels, scores, target)
        at_threshold = binary_metrics(labels, scores, threshold)
        assert at_threshold["defect_recall"] >= target and threshold <= 0.5
        # no other threshold up to 0.5 has the recall with fewer false alarms
        for other in np.unique(scores[scores <= 0.5]):
            alternative = binary_metrics(labels, scores, other)
            if alternative["defect_recall"] >= target:
                assert alternative["ok_recall"] <= at_threshold["ok_recall"]
    # the lowest score of all is a defect that must be caught: nothing below it, its score
    assert choose_threshold(np.array([1, 0]), np.array([0.3, 0.9]), 1.0) == pytest.approx(0.3)
    # a confident network: every defect above 0.5, no reason to raise the threshold
    assert choose_threshold(np.array([1, 1, 0, 0]), np.array([0.99, 0.9, 0.2, 0.01]), 0.5) == 0.5
    # a defect at 0.3 with ok images up to 0.01: the middle of the gap in logit space
    gap = choose_threshold(np.array([1, 1, 0]), np.array([0.9, 0.3, 0.01]), 1.0)
    assert gap == pytest.approx(_logit_midpoint(0.3, 0.01)) and 0.01 < gap < 0.3
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


def test_the_tradeoff_table_prices_each_target_recall_and_warns_past_a_third():
    from qi.evaluation.operating_point import tradeoff

    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 80)
    # defects score high, but a few hide among the good parts: catching them costs alarms
    scores = np.concatenate([rng.uniform(0.55, 1.0, 36), rng.uniform(0.0, 0.2, 4),
                             rng.uniform(0.0, 0.45, 80)])  # fmt: skip
    table = tradeoff(labels, scores, labels, scores, evidence=0.95, targets=(0.9, 0.99))
    names = ["balanced (evidence 95%, default)", "boundary 0.5", "0.90", "0.99"]
    assert list(table["target_recall"]) == names
    kept = tradeoff(labels, scores, labels, scores, evidence=0.3, targets=(0.9,))
    assert list(kept["target_recall"])[:2] == ["balanced (evidence 30%)", "boundary 0.5 (default)"]
    assert table["threshold"].iloc[1] == 0.5
    assert table["val_recall"].iloc[2] >= 0.9 and table["val_recall"].iloc[3] >= 0.99
    assert table["val_false_alarms"].iloc[1:].is_monotonic_increasing  # recall costs alarms
    frame = pd.DataFrame(
        {"image_path": ["x"] * 120, "label": labels, "defect_type": ["defect"] * 40 + ["none"] * 80}
    )
    at_half = evaluation_from_scores(labels, scores, frame, 0.5, None, validation=(labels, scores))
    assert at_half.warning is None
    threshold = choose_threshold(labels, scores, 0.99)
    costly = evaluation_from_scores(
        labels, scores, frame, threshold, 0.99, validation=(labels, scores)
    )
    assert costly.val_false_alarms > 1 / 3
    assert costly.warning.startswith(f"warning: threshold {threshold:.3f} flags")
    summary = summary_markdown(costly, [], "t")
    assert "## Operating points" in summary and costly.warning in summary
    # no target: the fewest balanced errors, mid-gap (here the classes overlap: 4 defects hide)
    from qi.evaluation.operating_point import balanced_threshold

    assert 0.2 < balanced_threshold(labels, scores) < 0.55


def test_the_default_threshold_has_the_fewest_balanced_errors_mid_gap():
    from qi.evaluation.operating_point import balanced_threshold

    # separated classes: the middle, in logit space, of the gap between them
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.01, 0.05, 0.1, 0.4, 0.9])
    assert balanced_threshold(labels, scores) == pytest.approx(_logit_midpoint(0.1, 0.4))
    # one good part among the defects: misclassify it rather than two defects, and a rare
    # class counts as much as a common one (1 of 2 defects weighs more than 1 of 8 good parts)
    labels = np.array([0] * 8 + [1, 1])
    scores = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.5, 0.3, 0.6])
    assert balanced_threshold(labels, scores) == pytest.approx(_logit_midpoint(0.07, 0.3))
    assert balanced_threshold(np.array([0, 0]), np.array([0.1, 0.2])) == 0.5


def test_test_time_views_are_kept_only_when_they_lower_the_validation_log_loss():
    import torch
    from sklearn.metrics import log_loss

    from qi.config import ModelConfig
    from qi.evaluation.scoring import views_on_validation
    from qi.inference import defect_probabilities
    from qi.models import build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(depth=2, width=4), 1, 16).eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 16, 16, 1), dtype=np.uint8)
    labels = np.array([0, 1] * 6)
    losses = {}
    for views in (1, 8):
        net.test_time_views = views
        losses[views] = log_loss(labels, np.clip(defect_probabilities(net, images), 1e-7, 1))
    net.test_time_views = 1
    assert views_on_validation(net, images, labels) == min(losses, key=losses.get)
    assert net.test_time_views == 1  # the choice is returned, not applied
    assert views_on_validation(net, images, np.zeros(12, int)) == 1  # one class: no test


def _calibrated(n: int, shift: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A classifier's validation scores whose best balanced boundary is at logit ``shift``."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    logits = np.where(labels == 1, rng.normal(1.2, 1.2, n), rng.normal(-1.2, 1.2, n)) + shift
    return labels, 1 / (1 + np.exp(-logits))


def test_the_threshold_leaves_05_only_on_clear_validation_evidence():
    from qi.evaluation.operating_point import (
        EVIDENCE_SHARE,
        balanced_threshold,
        threshold_evidence,
    )

    # 0.5 is right and 200 images say otherwise by chance: the balanced point moved, 0.5 stays
    labels, scores = _calibrated(200, 0.0, seed=1)
    assert abs(balanced_threshold(labels, scores) - 0.5) > 0.02
    assert threshold_evidence(labels, scores) < EVIDENCE_SHARE
    assert choose_threshold(labels, scores, None) == 0.5
    # a boundary that is really off (scores shifted by one logit) on 2000 images: it moves
    labels, scores = _calibrated(2000, 1.0, seed=1)
    evidence = threshold_evidence(labels, scores)
    assert evidence >= EVIDENCE_SHARE
    assert threshold_evidence(labels, scores) == evidence  # the same scores, the same answer
    assert choose_threshold(labels, scores, None) == balanced_threshold(labels, scores) > 0.6
    # a detector has no trained boundary to defend: the balanced threshold as before
    labels, scores = _calibrated(200, 0.0, seed=1)
    moved = choose_threshold(labels, scores, None, require_evidence=False)
    assert moved == balanced_threshold(labels, scores)
    # one class only, or too few to resample: no evidence
    assert threshold_evidence(np.zeros(10), np.linspace(0, 1, 10)) == 0.0


def test_the_balanced_threshold_counts_every_cut():
    """The sorted count agrees with trying every cut between distinct scores."""
    from qi.evaluation.operating_point import balanced_error, balanced_threshold

    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = (rng.random(60) < 0.4).astype(int)
        scores = np.round(rng.random(60), 2)  # ties included
        values = np.unique(scores)
        cuts = (values[:-1] + values[1:]) / 2
        fewest = min(balanced_error(labels, scores, c) for c in cuts)
        chosen = balanced_threshold(labels, scores)
        assert balanced_error(labels, scores, chosen) == pytest.approx(fewest)
