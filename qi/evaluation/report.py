"""Pictures and words for an :class:`~qi.evaluation.Evaluation`, logged on a run.

Artifacts under ``evaluation/``: confusion matrices (counts and normalised), the
classification report (text and JSON), ROC and precision-recall curves, a grid of
misclassified images, recall per defect type (CSV and bar chart), for a model that learned
defect types the (ok + types) confusion matrix, type report and most frequent confusions with
example pairs, and ``summary.md`` that puts them together.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
from sklearn.metrics import PrecisionRecallDisplay, RocCurveDisplay  # noqa: E402

from qi.data.preprocessing import PreprocessConfig, load_and_preprocess  # noqa: E402
from qi.evaluation.metrics import Evaluation  # noqa: E402
from qi.evaluation.types import TypeEvaluation  # noqa: E402
from qi.inference import LABELS  # noqa: E402
from qi.tags import Artifact, Tag  # noqa: E402
from qi.tracking import log_artifact_folder, log_metrics, set_tags  # noqa: E402

ARTIFACT_DIR = Artifact.EVALUATION_DIR
MAX_MISCLASSIFIED = 24


def plot_confusion(evaluation: Evaluation, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, normalize, title, fmt in (
        (axes[0], None, "counts", "d"),
        (axes[1], "true", "share of each true class", ".1%"),
    ):
        matrix = evaluation.confusion(normalize=normalize)
        sns.heatmap(
            matrix,
            annot=True,
            fmt=fmt,
            cmap="Blues",
            cbar=False,
            square=True,
            ax=ax,
            xticklabels=LABELS,
            yticklabels=LABELS,
            annot_kws={"size": 13},
        )
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle(f"Test confusion matrix at threshold {evaluation.threshold:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(evaluation: Evaluation, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    RocCurveDisplay.from_predictions(
        evaluation.labels, evaluation.scores, ax=axes[0], name="model", pos_label=1
    )
    axes[0].plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes[0].set_title("ROC (defective = positive)")
    PrecisionRecallDisplay.from_predictions(
        evaluation.labels, evaluation.scores, ax=axes[1], name="model", pos_label=1
    )
    recall = evaluation.metrics["defect_recall"]
    precision = evaluation.metrics["precision"]
    axes[1].scatter(
        [recall],
        [precision],
        color="crimson",
        zorder=3,
        label=f"threshold {evaluation.threshold:.3f}",
    )
    axes[1].legend(loc="lower left")
    axes[1].set_title("Precision-recall")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _truth(row) -> str:
    truth = LABELS[int(row["label"])]
    if row["defect_type"] not in ("none", "defect"):
        truth = f"{truth} ({row['defect_type']})"
    return truth


def plot_type_confusion(types: TypeEvaluation, path: Path) -> Path:
    """The (ok + types) confusion matrix of the test split: counts and share of each row."""
    size = 1.2 + 0.75 * len(types.classes)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1.5, size))
    for ax, normalize, title, fmt in (
        (axes[0], None, "counts", "d"),
        (axes[1], "true", "share of each true class", ".0%"),
    ):
        table = types.confusion(normalize)
        sns.heatmap(table, annot=True, fmt=fmt, cmap="Blues", cbar=False, ax=ax)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
    fig.suptitle("Test split: ok and defect types")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_type_confusion_pairs(types: TypeEvaluation, path: Path) -> Path | None:
    """Each frequent confusion as a pair: an image of the true type that the model named
    otherwise, beside an image of the type it named (one it named right)."""
    confusions = types.frequent_confusions()
    if confusions.empty:
        return None
    show = PreprocessConfig(image_size=160, color_mode="rgb")
    fig, axes = plt.subplots(len(confusions), 2, figsize=(5, 2.6 * len(confusions)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for row, item in enumerate(confusions.itertuples()):
        axes[row, 0].imshow(load_and_preprocess(item.example, show))
        axes[row, 0].set_title(f"{item.true}, named {item.named}\n({item.images} such)", fontsize=8)
        if item.named_example:
            axes[row, 1].imshow(load_and_preprocess(item.named_example, show))
            axes[row, 1].set_title(f"a {item.named}, named right", fontsize=8)
    fig.suptitle("Most frequent type confusions", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def types_markdown(types: TypeEvaluation) -> list[str]:
    """The summary's section on defect types."""
    lines = [
        "## Defect types",
        "",
        f"Among the {types.caught} caught defects of a learned type: type accuracy "
        f"{types.caught_accuracy:.4f}, macro F1 of the types {types.caught_macro_f1:.4f}. "
        "A part judged ok has no type.",
        "",
        "```",
        types.report_text.rstrip(),
        "```",
        "",
    ]
    confusions = types.frequent_confusions()
    if not confusions.empty:
        lines += ["| true type | named | images |", "| --- | --- | --- |"]
        lines += [f"| {r.true} | {r.named} | {r.images} |" for r in confusions.itertuples()]
        lines.append("")
    return lines


def plot_misclassified(
    evaluation: Evaluation, path: Path, explainer: Callable | None = None
) -> Path | None:
    """The most confident mistakes; with an explainer, each beside its Grad-CAM overlay."""
    wrong = np.flatnonzero(evaluation.predicted != evaluation.labels)
    if wrong.size == 0:
        return None
    # the most confident mistakes first: those say most about the model
    wrong = wrong[np.argsort(-np.abs(evaluation.scores[wrong] - evaluation.threshold))]
    wrong = wrong[:MAX_MISCLASSIFIED]
    paths = [evaluation.frame.iloc[i]["image_path"] for i in wrong]
    if explainer is not None:
        pictures = explainer(paths)
    else:
        show = PreprocessConfig(image_size=160, color_mode="rgb")
        pictures = [(load_and_preprocess(p, show), None) for p in paths]
    per_row = 6 if explainer is None else 3  # mistakes per row (with overlays: pairs)
    columns = min(per_row, wrong.size) * (1 if explainer is None else 2)
    rows = int(np.ceil(wrong.size / per_row))
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    step = 1 if explainer is None else 2
    for k, (index, (image, heat)) in enumerate(zip(wrong, pictures, strict=True)):
        ax = axes.flat[k * step]
        ax.imshow(image)
        row = evaluation.frame.iloc[index]
        ax.set_title(
            f"true: {_truth(row)}\npred: {LABELS[evaluation.predicted[index]]} "
            f"p={evaluation.scores[index]:.2f}",
            fontsize=8,
        )
        if heat is not None:
            axes.flat[k * step + 1].imshow(heat)
            axes.flat[k * step + 1].set_title("where it looked", fontsize=8)
    fig.suptitle(
        f"Misclassified test images ({int((evaluation.predicted != evaluation.labels).sum())}"
        f" in all, most confident first)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_defect_gallery(evaluation: Evaluation, path: Path, explainer: Callable) -> Path | None:
    """Per defect type, one caught (the surest) and one missed (the lowest scored) test
    image, each with its Grad-CAM overlay: which kinds the model sees, and where."""
    if evaluation.by_defect_type is None:
        return None
    frame = evaluation.frame.assign(score=evaluation.scores, caught=evaluation.predicted == 1)
    defects = frame[frame["label"] == 1]
    types = list(evaluation.by_defect_type["defect_type"])
    picks: list[tuple[str, str, object]] = []  # (type, "caught"/"missed", row or None)
    for kind in types:
        of_kind = defects[defects["defect_type"] == kind]
        caught, missed = of_kind[of_kind["caught"]], of_kind[~of_kind["caught"]]
        picks.append(
            (kind, "caught", caught.loc[caught["score"].idxmax()] if len(caught) else None)
        )
        picks.append(
            (kind, "missed", missed.loc[missed["score"].idxmin()] if len(missed) else None)
        )
    shown = iter(explainer([row["image_path"] for _, _, row in picks if row is not None]))
    fig, axes = plt.subplots(len(types), 4, figsize=(9.2, 2.5 * len(types)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (kind, outcome, row) in enumerate(picks):
        left, right = axes.flat[2 * k], axes.flat[2 * k + 1]
        if row is None:
            left.text(0.5, 0.5, f"{kind}:\nnone {outcome}", ha="center", va="center", fontsize=9)
            continue
        image, heat = next(shown)
        left.imshow(image)
        left.set_title(f"{kind}: {outcome}, p={row['score']:.2f}", fontsize=8)
        right.imshow(heat)
    fig.suptitle(
        "Per defect type: the surest catch and the lowest-scored miss, with Grad-CAM",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_defect_recall(evaluation: Evaluation, path: Path) -> Path | None:
    table = evaluation.by_defect_type
    if table is None or table.empty:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(table) + 1.6))
    sns.barplot(data=table, x="recall", y="defect_type", color="steelblue", ax=ax)
    for i, row in table.iterrows():
        ax.text(
            row["recall"] + 0.01,
            i,
            f"{int(row['caught'])}/{int(row['images'])}",
            va="center",
            fontsize=9,
            color="black",
        )
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("recall (share of defects caught)")
    ax.set_ylabel("")
    ax.set_title(f"Recall per defect type at threshold {evaluation.threshold:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_markdown(evaluation: Evaluation, pictures: list[str], title: str) -> str:
    m, h = evaluation.metrics, evaluation.metrics_at_half
    rows = [
        f"| metric | at threshold {evaluation.threshold:.3f} | at 0.5 |",
        "| --- | --- | --- |",
    ]
    for key in (
        "acc",
        "precision",
        "defect_recall",
        "ok_recall",
        "f1",
        "macro_f1",
        "auroc",
        "average_precision",
        "log_loss",
    ):
        rows.append(f"| {key} | {m[key]:.4f} | {h[key]:.4f} |")
    matrix = evaluation.confusion()
    origin = f"Threshold {evaluation.threshold:.4f}: {evaluation.threshold_origin}."
    lines = [
        f"# {title}",
        "",
        f"Test split: {len(evaluation.labels)} images "
        f"({int(evaluation.labels.sum())} defective). " + origin,
        "",
        *rows,
        "",
        f"Missed defects: {int(matrix[1, 0])}; false alarms: {int(matrix[0, 1])}.",
        "",
    ]
    if evaluation.warning:
        lines += [f"**{evaluation.warning}**", ""]
    if evaluation.tradeoff is not None:
        lines += [
            "## Operating points",
            "",
            "What each target defect recall costs: the threshold validation gives it, and the "
            "share of good parts it flags.",
            "",
            evaluation.tradeoff_markdown(),
            "",
        ]
    if evaluation.by_defect_type is not None:
        lines += [
            "## Recall per defect type",
            "",
            "| defect type | images | caught | recall |",
            "| --- | --- | --- | --- |",
        ]
        for _, row in evaluation.by_defect_type.iterrows():
            lines.append(
                f"| {row['defect_type']} | {int(row['images'])} | {int(row['caught'])} "
                f"| {row['recall']:.3f} |"
            )
        lines.append("")
    if evaluation.types is not None:
        lines += types_markdown(evaluation.types)
    lines += [f"![{Path(p).stem}]({Path(p).name})" for p in pictures]
    return "\n".join(lines) + "\n"


def write_type_tables(types: TypeEvaluation, folder: Path) -> None:
    """The type report (text, JSON), the confusion matrix (counts, normalised) and the
    frequent confusions with their example images, as files in ``folder``."""
    (folder / "type_report.txt").write_text(types.report_text)
    (folder / "type_report.json").write_text(json.dumps(types.report, indent=2))
    types.confusion().to_csv(folder / "type_confusion_counts.csv")
    types.confusion("true").to_csv(folder / "type_confusion_normalised.csv")
    types.frequent_confusions().to_csv(folder / "type_confusions.csv", index=False)


def log_evaluation(
    evaluation: Evaluation, run_id: str, title: str = "Evaluation", net=None, preprocess=None
) -> list[str]:
    """Metrics and every artifact on ``run_id``; returns the artifact paths. With the
    network and its preprocessing, mistakes and the defect-type gallery get heatmaps."""
    log_metrics(evaluation.flat_metrics(), run_id)
    explainer = None
    if net is not None and preprocess is not None:
        from qi.heatmaps import Explainer

        explainer = Explainer(net, preprocess)
    with tempfile.TemporaryDirectory(prefix="qi-eval-") as tmp:
        folder = Path(tmp)
        pictures = [
            p
            for p in (
                plot_confusion(evaluation, folder / "confusion_matrix.png"),
                plot_curves(evaluation, folder / "roc_pr_curves.png"),
                plot_defect_recall(evaluation, folder / "recall_by_defect_type.png"),
                plot_misclassified(evaluation, folder / "misclassified.png", explainer),
                plot_defect_gallery(evaluation, folder / "defect_gallery.png", explainer)
                if explainer is not None
                else None,
                *(
                    (
                        plot_type_confusion(evaluation.types, folder / "type_confusion_matrix.png"),
                        plot_type_confusion_pairs(evaluation.types, folder / "type_confusions.png"),
                    )
                    if evaluation.types is not None
                    else ()
                ),
            )
            if p is not None
        ]
        (folder / "classification_report.txt").write_text(evaluation.report_text)
        (folder / "classification_report.json").write_text(json.dumps(evaluation.report, indent=2))
        if evaluation.by_defect_type is not None:
            evaluation.by_defect_type.to_csv(folder / "recall_by_defect_type.csv", index=False)
        if evaluation.tradeoff is not None:
            evaluation.tradeoff.to_csv(folder / "operating_points.csv", index=False)
        if evaluation.types is not None:
            write_type_tables(evaluation.types, folder)
        (folder / "summary.md").write_text(
            summary_markdown(evaluation, [str(p) for p in pictures], title)
        )
        log_artifact_folder(run_id, folder, ARTIFACT_DIR)
        # the run's description in the UI: the figures and the operating point at a glance
        note = summary_markdown(evaluation, [], title)
        note += f"\nCharts, heatmaps and tables: Artifacts, `{ARTIFACT_DIR}/`.\n"
        set_tags(run_id, {Tag.NOTE: note})
        return [f"{ARTIFACT_DIR}/{p.name}" for p in sorted(folder.iterdir())]
