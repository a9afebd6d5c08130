"""Which defect, measured: a model's defect types on a split, at its operating point.

Pure functions of the split's rows, the good/defective decisions and the type probabilities
(no network here: :mod:`qi.evaluation.scoring` runs it). A part the model passes as ok has no
type, so the classes are ``ok`` plus the learned types; a defective image whose type was not
learned counts under :data:`NOT_LEARNED`, on the truth side only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import classification_report, confusion_matrix, f1_score

OK = "ok"
NOT_LEARNED = "(type not learned)"


@dataclass
class TypeEvaluation:
    """The (ok + types) view of one split."""

    types: tuple[str, ...]
    truth: np.ndarray  # per image: "ok", a learned type, or NOT_LEARNED
    predicted: np.ndarray  # per image: "ok" or the predicted type
    type_probabilities: np.ndarray  # (N, K)
    image_paths: np.ndarray
    report: dict  # scikit-learn's classification report over ok + types
    report_text: str
    caught_accuracy: float  # type right, among defects of a learned type the model caught
    caught_macro_f1: float  # macro F1 of the types over those images
    caught: int  # how many such images

    @property
    def classes(self) -> list[str]:
        return [OK, *self.types]

    def confusion(self, normalize: str | None = None) -> pd.DataFrame:
        """Truth (rows, NOT_LEARNED included when present) by prediction (columns)."""
        rows = self.classes + ([NOT_LEARNED] if (self.truth == NOT_LEARNED).any() else [])
        matrix = confusion_matrix(self.truth, self.predicted, labels=rows)
        table = pd.DataFrame(matrix, index=rows, columns=rows)[self.classes]
        if normalize == "true":
            table = table.div(table.sum(axis=1).replace(0, 1), axis=0)
        return table

    def frequent_confusions(self, top: int = 5) -> pd.DataFrame:
        """The most frequent (true type, named as) pairs among caught defects, with one image
        of each mistake and one image the model named right of the type it was taken for."""
        caught = (self.truth != OK) & (self.truth != NOT_LEARNED) & (self.predicted != OK)
        wrong = caught & (self.truth != self.predicted)
        pairs = pd.DataFrame({"true": self.truth[wrong], "named": self.predicted[wrong]})
        if pairs.empty:
            return pd.DataFrame(columns=["true", "named", "images", "example", "named_example"])
        counted = pairs.value_counts().rename("images").reset_index().head(top)
        right = caught & (self.truth == self.predicted)
        examples, references = [], []
        for true, named in zip(counted["true"], counted["named"], strict=True):
            mistaken = self.image_paths[wrong & (self.truth == true) & (self.predicted == named)]
            reference = self.image_paths[right & (self.truth == named)]
            examples.append(str(mistaken[0]))
            references.append(str(reference[0]) if len(reference) else "")
        return counted.assign(example=examples, named_example=references)

    def metrics(self, prefix: str = "test") -> dict[str, float]:
        return {
            f"{prefix}/type_accuracy_caught": self.caught_accuracy,
            f"{prefix}/type_macro_f1": self.caught_macro_f1,
            f"{prefix}/ok_and_types_macro_f1": float(self.report["macro avg"]["f1-score"]),
        }


def evaluate_types(
    frame: pd.DataFrame,
    decisions: np.ndarray,
    type_probabilities: np.ndarray,
    types: tuple[str, ...],
) -> TypeEvaluation:
    """The (ok + types) figures of a split's rows (``label``, ``defect_type``,
    ``image_path``) at the model's good/defective ``decisions``."""
    labels = frame["label"].to_numpy()
    kinds = frame["defect_type"].astype(str).to_numpy()
    truth = np.where(labels == 1, np.where(np.isin(kinds, types), kinds, NOT_LEARNED), OK)
    named = np.asarray(types, dtype=object)[type_probabilities.argmax(1)]
    predicted = np.where(np.asarray(decisions) == 1, named, OK).astype(object)
    classes = [OK, *types]
    scored = truth != NOT_LEARNED
    report = classification_report(
        truth[scored], predicted[scored], labels=classes, output_dict=True, zero_division=0
    )
    text = classification_report(
        truth[scored], predicted[scored], labels=classes, digits=4, zero_division=0
    )
    caught = scored & (truth != OK) & (predicted != OK)
    accuracy = float((truth[caught] == predicted[caught]).mean()) if caught.any() else float("nan")
    macro = (
        # over the types present among them: an absent type is no evidence either way
        float(f1_score(truth[caught], predicted[caught], labels=sorted(set(truth[caught])),
                       average="macro", zero_division=0))
        if caught.any()
        else float("nan")
    )  # fmt: skip
    return TypeEvaluation(
        types=tuple(types),
        truth=truth.astype(object),
        predicted=predicted,
        type_probabilities=type_probabilities,
        image_paths=frame["image_path"].astype(str).to_numpy(),
        report=report,
        report_text=text,
        caught_accuracy=accuracy,
        caught_macro_f1=macro,
        caught=int(caught.sum()),
    )
