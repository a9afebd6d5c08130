"""Design measurements on cached frozen-encoder features: which stages, which type head,
which head kind.

    pip install -e ".[bench]"                      # elpv-dataset for the ELPV measurements
    python benchmarks/cached_heads.py              # all three measurements
    python benchmarks/cached_heads.py --only stages   # or: types, heads
    python benchmarks/cached_heads.py --only heads --head svm   # the heads whose name starts so
    python benchmarks/cached_heads.py --quick      # smoke run (used by the tests)

Both read qi's own feature cache (:mod:`qi.data.embeddings`: EfficientNet-Lite0 at 224 px,
average and max pooled, the 8 flips/rotations of each training image as training copies,
probabilities averaged over the 8 views of a scored image) and fit L2-regularised logistic
regressions on standardised features (scikit-learn; what qi's linear head is, up to its
optimiser), so they compare the *features* and the *design*, not a training recipe.

- ``stages``: the ELPV mono cells (the benchmark's 75/25 split, seed 42); 5-fold
  cross-validated ROC AUC and accuracy at 0.5 over the training cells (what a choice may be
  made on), and the test split's, for the last map alone and with intermediate stages
  (``--feature-stages``). The polycrystalline cells are not read.
- ``types``: the embedded castings; a binary head plus a type head on the same features (qi's
  design) against one softmax over ok + the types (defect probability 1 - p(ok)): binary ROC
  AUC and accuracy, type accuracy and macro F1 among the caught defects, 5-fold over
  train + validation (mean and spread) and on test.
- ``heads``: the ELPV mono cells; qi's own heads (``--head-kind`` mlp, logistic, svm, at
  several C, the svm on a sample of its copies and on the stride 16 and 32 stages too;
  ``--head`` keeps the rows whose name starts with it) through qi's own code: 5-fold
  out-of-fold figures over train + validation
  (:func:`qi.fit.fitting.out_of_fold_probabilities`, what ``--cv-folds 5`` scores a trial
  by) and the test split's after qi's fit on train (early stopping on validation); seconds
  per fit once the features are cached.
"""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from _common import benchmark_args

STAGE_SETS = {
    "last map": (), "+ 32": (32,), "+ 16": (16,), "+ 16,32": (16, 32), "+ 8,16,32": (8, 16, 32),
}  # fmt: skip
C = 0.01  # the regularisation both measurements use (the best of 0.001-0.1 on the last map)


def frozen(stages=(), types=(), channels=3, size=224):
    from qi.config import ModelConfig
    from qi.models import build_model

    config = ModelConfig(name="efficientnet_lite0", finetune="head", feature_stages=stages)
    return build_model(config, channels, size, defect_types=types).eval()


def logistic(balanced: bool = True):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=3000, class_weight="balanced" if balanced else None)


def fit_views(model, features: np.ndarray, targets: np.ndarray):
    """Standardise and fit on every view of every image; returns a scorer of ``(V, N, D)``."""
    from sklearn.preprocessing import StandardScaler

    views, n, dim = features.shape
    scaler = StandardScaler().fit(features.reshape(-1, dim))
    model.fit(scaler.transform(features.reshape(-1, dim)), np.tile(targets, views))
    return lambda x: np.mean([model.predict_proba(scaler.transform(v)) for v in x], axis=0)


def folds(labels: np.ndarray, quick: bool):
    from sklearn.model_selection import StratifiedKFold

    k = 2 if quick else 5
    return StratifiedKFold(k, shuffle=True, random_state=0).split(np.zeros(len(labels)), labels)


def prepared(data_dir: Path | None, size: int):
    from qi.config import DataConfig
    from qi.data.datamodule import prepare_data

    config = (
        DataConfig(data_dir=data_dir, image_size=size) if data_dir else DataConfig(image_size=size)
    )
    return prepare_data(config, progress=False)


def mono_cells(quick: bool):
    """(prepared data, its description, image size): the ELPV mono cells, or with --quick or
    without the elpv-dataset package a synthetic stand-in."""
    from real_data import elpv_installed, write_elpv, write_stand_in

    with tempfile.TemporaryDirectory(prefix="qi-heads-") as tmp:
        folder = Path(tmp) / "cells"
        if elpv_installed() and not quick:
            write_elpv("mono", folder)
            source = "ELPV mono cells, 75/25 stratified, seed 42"
        else:
            write_stand_in(folder)
            source = "synthetic stand-in"
        size = 64 if quick else 224
        return prepared(folder, size), source, size


def stages(quick: bool) -> list[str]:
    from sklearn.metrics import accuracy_score, roc_auc_score

    from qi.data.embeddings import embeddings

    data, source, size = mono_cells(quick)
    frame = data.frame
    training = frame["split"].isin(["train", "val"]).to_numpy()
    test = (frame["split"] == "test").to_numpy()
    labels = frame["label"].to_numpy()
    lines = [
        f"stages ({source}; Lite0 {size} px, avgmax, 8 views, logistic C={C})",
        "| features | width | 5-fold ROC AUC | 5-fold acc@0.5 | test ROC AUC | test acc@0.5 "
        "| seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, strides in STAGE_SETS.items():
        started = time.perf_counter()
        net = frozen(strides, channels=data.preprocess.channels, size=size)
        train_x = embeddings(net, data.images[training], views=8, progress=False)
        test_x = embeddings(net, data.images[test], views=8, progress=False)
        y = labels[training]
        scores = np.zeros(len(y))
        for a, b in folds(y, quick):
            scores[b] = fit_views(logistic(), train_x[:, a], y[a])(train_x[:, b])[:, 1]
        tested = fit_views(logistic(), train_x, y)(test_x)[:, 1]
        lines.append(
            f"| {name} | {train_x.shape[-1]} | {roc_auc_score(y, scores):.4f} | "
            f"{accuracy_score(y, scores >= 0.5):.4f} | "
            f"{roc_auc_score(labels[test], tested):.4f} | "
            f"{accuracy_score(labels[test], tested >= 0.5):.4f} | "
            f"{time.perf_counter() - started:.0f} |"
        )
    return lines


def types(quick: bool) -> list[str]:
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from qi.data.embeddings import embeddings
    from qi.data.types import learnable_types, type_targets

    size = 64 if quick else 224
    if quick:  # 240 generated castings: the smoke run checks the code, not the figures
        from qi.config import SynthConfig
        from qi.data import synth

        with tempfile.TemporaryDirectory(prefix="qi-types-") as tmp:
            small = SynthConfig(n_train=200, n_test=40, image_size=size)
            data = prepared(synth.generate(Path(tmp), small, progress=False), size)
    else:
        data = prepared(None, size)
    kinds = learnable_types(data.frame)
    net = frozen(types=kinds, channels=data.preprocess.channels, size=size)
    frame = data.frame
    training = frame["split"].isin(["train", "val"]).to_numpy()
    test = (frame["split"] == "test").to_numpy()
    x_train = embeddings(net, data.images[training], views=8, progress=False)
    x_test = embeddings(net, data.images[test], views=8, progress=False)
    y_train, y_test = frame["label"].to_numpy()[training], frame["label"].to_numpy()[test]
    k_train, k_test = type_targets(frame[training], kinds), type_targets(frame[test], kinds)

    def binary_and_type_head(x, y, k, scored):
        defect = fit_views(logistic(), x, y)(scored)[:, 1]
        typed = k >= 0
        kind = fit_views(logistic(False), x[:, typed], k[typed])(scored).argmax(1)
        return defect, kind

    def softmax_over_ok_and_types(x, y, k, scored):
        keep = (y == 0) | (k >= 0)
        classes = np.where(y == 0, 0, k + 1)[keep]
        probability = fit_views(logistic(), x[:, keep], classes)(scored)
        return 1 - probability[:, 0], probability[:, 1:].argmax(1)

    def figures(y, k, defect, kind):
        caught = (y == 1) & (defect >= 0.5) & (k >= 0)
        return (
            roc_auc_score(y, defect),
            accuracy_score(y, defect >= 0.5),
            accuracy_score(k[caught], kind[caught]),
            f1_score(k[caught], kind[caught], average="macro"),
        )

    lines = [
        f"types (embedded castings, {len(kinds)} types; Lite0 {size} px, avgmax, 8 views, "
        f"logistic C={C}); 5-fold mean ± sd, then test",
        "| design | ROC AUC | acc@0.5 | type acc (caught) | type macro F1 | test ROC AUC | "
        "test acc | test type acc | test type macro F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    strata = np.where(y_train == 0, 0, k_train + 1)
    for name, design in (
        ("binary head + type head (qi)", binary_and_type_head),
        ("softmax over ok + types", softmax_over_ok_and_types),
    ):
        rows = []
        for a, b in folds(strata, quick):
            rows.append(
                figures(
                    y_train[b],
                    k_train[b],
                    *design(x_train[:, a], y_train[a], k_train[a], x_train[:, b]),
                )
            )
        mean, spread = np.mean(rows, 0), np.std(rows, 0)
        tested = figures(y_test, k_test, *design(x_train, y_train, k_train, x_test))
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mean, spread, strict=True)]
        cells += [f"{t:.4f}" for t in tested]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


HEADS = {
    "mlp, linear": {"head_kind": "mlp", "head_hidden": 0},
    "mlp, 256 hidden": {"head_kind": "mlp", "head_hidden": 256},
    **{f"logistic, C={c:g}": {"head_kind": "logistic", "head_c": c} for c in (1e-3, 1e-2, 1e-1)},
    **{f"svm, C={c:g}, all copies": {"head_kind": "svm", "head_c": c} for c in (1.0, 10.0)},
    # how many training copies the svm is fitted on (qi.fit.estimators.SVM_MAX_SAMPLES)
    **{
        f"svm, C=10, {n:,} sampled copies": {"head_kind": "svm", "head_c": 10.0, "samples": n}
        for n in (4096, 2600)
    },
    # the stride 16 and 32 stages' pooled features beside the last map's (--feature-stages)
    "svm, C=10, all copies, + strides 16, 32": {
        "head_kind": "svm", "head_c": 10.0, "feature_stages": (16, 32)
    },
}  # fmt: skip


def fill_feature_cache(model, data) -> None:
    """Computes the frozen encoder's features of every array the heads' fits read (the
    train and validation splits, which the folds read too, and test for the scores), so no
    row's seconds include an encoder pass. The cache is keyed by the arrays' pixels and the
    encoder's weights, so these must be the very arrays qi's fit and cross-validation pass,
    through the encoder of the same ``model`` config they build."""
    from qi.data.embeddings import embeddings
    from qi.models import build_model
    from qi.views import VIEWS

    net = build_model(model, data.preprocess.channels, data.preprocess.image_size)
    for split in ("train", "val", "test"):
        embeddings(net, data.split(split)[0], views=VIEWS, progress=False)


def heads(quick: bool, only: str = "") -> list[str]:
    from dataclasses import replace

    from sklearn.metrics import accuracy_score, roc_auc_score

    from qi.config import RunConfig
    from qi.evaluation.scoring import validation_probabilities
    from qi.fit import estimators
    from qi.fit.fitting import fit, out_of_fold_probabilities
    from qi.study.space import FROZEN_HEAD

    data, source, size = mono_cells(quick)
    base = RunConfig()
    base = replace(
        base,
        data=replace(base.data, image_size=size),
        model=replace(base.model, **FROZEN_HEAD),
        train=replace(base.train, epochs=2 if quick else base.train.epochs),
    )
    test_images, test_labels = data.split("test")
    k = 2 if quick else 5
    lines = [
        f"heads ({source}; Lite0 {size} px, avgmax, 8 views; qi's fit and TrainConfig defaults)",
        f"| head | {k}-fold ROC AUC | {k}-fold acc@0.5 | test ROC AUC | test acc@0.5 | "
        "seconds per fit |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    fill_feature_cache(base.model, data)  # every row's fits are then timed alone
    default_samples = estimators.SVM_MAX_SAMPLES
    quick_heads = ("mlp, linear", "logistic, C=0.01", "svm, C=10, 4,096 sampled copies")
    for name, fields in HEADS.items():
        if quick and name not in quick_heads:  # one of each kind
            continue
        if not name.startswith(only):
            continue
        fields = dict(fields)
        estimators.SVM_MAX_SAMPLES = fields.pop("samples", 10**9)  # all copies, or a sample
        config = replace(base, model=replace(base.model, **fields))
        started = time.perf_counter()
        try:
            labels, scores = out_of_fold_probabilities(config, data, k)
            net = fit(config, data, run_id=None, progress=False).net
        finally:
            estimators.SVM_MAX_SAMPLES = default_samples
        seconds = (time.perf_counter() - started) / (k + 1)
        tested = validation_probabilities(net, test_images)
        lines.append(
            f"| {name} | {roc_auc_score(labels, scores):.4f} | "
            f"{accuracy_score(labels, scores >= 0.5):.4f} | "
            f"{roc_auc_score(test_labels, tested):.4f} | "
            f"{accuracy_score(test_labels, tested >= 0.5):.4f} | {seconds:.1f} |"
        )
    return lines


def main() -> None:
    args = benchmark_args(__doc__, quick={}, only="", head="")
    os.environ.setdefault("QI_CACHE_DIR", tempfile.mkdtemp(prefix="qi-heads-cache-"))
    print(f"machine: {os.cpu_count()} CPUs; cache {os.environ['QI_CACHE_DIR']}")
    measures = (("stages", stages), ("types", types), ("heads", partial(heads, only=args.head)))
    for name, measure in measures:
        if args.only in ("", name):
            for line in measure(args.quick):
                print(line, flush=True)


if __name__ == "__main__":
    main()
