"""Heads fitted by scikit-learn on a frozen encoder's cached features, kept as torch layers.

On a few hundred images, what the field trusts on fixed features is a regularised logistic
regression solved to its optimum, or an RBF support-vector machine with calibrated
probabilities (``--head-kind logistic`` / ``svm``); scikit-learn fits both, and fits them
better than a hand-written loop would. The fitted estimator is then copied into torch layers
(a ``Linear``; a :class:`~qi.models.parts.KernelHead`) and the estimator object is dropped:

- a registered model carries tensors only, loaded with ``weights_only`` (a pickled estimator
  would run code from the registry when loaded);
- the served, explained (Grad-CAM) and exported network is the same torch graph as any
  head's, so ONNX export and its parity check need no skl2onnx;
- an ensemble, cross-validation and the operating point read it as any other head.

Training copies are every flip/rotation of each training image (as the mlp head's); the
SVM's Platt calibration is fitted out-of-fold with folds that keep an image's views together
(its copies in both would make the calibration overconfident).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.svm import SVC
from torch import nn

from qi.config import ModelConfig, head_c_of
from qi.models import has_frozen_encoder
from qi.views import VIEWS

CALIBRATION_FOLDS = 3
# seconds per squared training copy of an svm head's whole fit (the SVC and its 3 calibration
# folds) on 2 cores of this project's Xeon, 2,560 features: 38 s for 5,152 copies (ELPV mono)
SVM_SECONDS_PER_SQUARED_ROW = 38 / 5152**2
# an RBF SVM's fit grows with the square of its samples or worse: beyond this many training
# copies it is fitted on a seeded sample of them, every kind of view kept (the first views of
# each image alone are rotations without flips: 2 points of 5-fold ROC AUC lost on ELPV).
# On the ELPV mono cells (5,152 copies, all fitted) 4,096 sampled rows kept the 5-fold figures
# but lost the default study's validation choice; 6,144 rows cost about 50 s on 2 cores
SVM_MAX_SAMPLES = 6144
MAX_ITERATIONS = 2000
ABSENT_TYPE_BIAS = -30.0  # a type no training image shows: never the most likely


def fit_estimator_head(
    head: nn.Sequential,
    features: np.ndarray,
    targets: np.ndarray,
    model: ModelConfig,
    balance: bool,
) -> None:
    """Fit ``head`` (built for ``model.head_kind`` logistic or svm) in place on ``features``
    ``(V, N, D)`` (every view of each training image) and ``targets``: ``(N,)`` labels, or
    ``(N, 2)`` rows of (label, type index or -1) when it also names types. ``balance``
    weights the classes alike, as the mlp head's loss does."""
    views, n, dim = features.shape
    flat = torch.from_numpy(np.ascontiguousarray(features.reshape(views * n, dim)))
    head[0].set_from(flat)
    x = head[0](flat).numpy()
    targets = np.concatenate([targets] * views)  # views-major, as the features
    labels = (targets[:, 0] if targets.ndim == 2 else targets).astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("a logistic or svm head needs good and defective training images")
    weight = "balanced" if balance else None
    c = head_c_of(model.head_kind, model.head_c)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=ConvergenceWarning)
        if model.head_kind == "logistic":
            estimator = LogisticRegression(C=c, class_weight=weight, max_iter=MAX_ITERATIONS)
            estimator.fit(x, labels)
            _copy_rows(head[-1], 0, estimator.coef_, estimator.intercept_)
            types_layer = head[-1]
            first_type = 1
        elif model.head_kind == "svm":
            chosen = svm_samples(views, n)
            groups = np.tile(np.arange(n), views)
            _fit_svm(head[-1], x[chosen], labels[chosen], groups[chosen], c, weight)
            types_layer = head[-1].types
            first_type = 0
        else:
            raise ValueError(f"head kind {model.head_kind!r} is fitted by gradient, not here")
        if targets.ndim == 2 and types_layer is not None:
            _fit_types(types_layer, first_type, x, targets[:, 1].astype(int), c)


def fitted_by_scikit_learn(model: ModelConfig) -> bool:
    """Whether ``model`` is a logistic or svm head on a frozen pretrained encoder: fitted at
    once, outside Lightning's epochs (nothing to stop half-way)."""
    return model.head_kind != "mlp" and has_frozen_encoder(model)


def svm_fit_seconds(training_images: int, views: int = VIEWS) -> float:
    """About how long an svm head's fit takes on 2 CPU cores: what a study's deadline weighs
    before starting one (a GPU or more cores only make it shorter)."""
    rows = min(training_images * views, SVM_MAX_SAMPLES)
    return SVM_SECONDS_PER_SQUARED_ROW * rows**2


def svm_samples(views: int, images: int, seed: int = 0) -> np.ndarray:
    """Rows (views-major) an svm head is fitted on: every view of every image up to
    :data:`SVM_MAX_SAMPLES`, else a seeded sample of them (views of every kind stay)."""
    rows = np.arange(views * images)
    if len(rows) > SVM_MAX_SAMPLES:
        rows = np.sort(np.random.default_rng(seed).choice(rows, SVM_MAX_SAMPLES, replace=False))
    return rows


def _fit_svm(kernel, x, labels, groups, c: float, weight) -> None:
    splits = list(GroupKFold(n_splits=CALIBRATION_FOLDS).split(x, labels, groups))
    calibrated = CalibratedClassifierCV(
        SVC(C=c, kernel="rbf", gamma="scale", class_weight=weight),
        method="sigmoid",
        cv=splits,
        ensemble=False,
    ).fit(x, labels)
    (fitted,) = calibrated.calibrated_classifiers_
    svc, (sigmoid,) = fitted.estimator, fitted.calibrators
    kernel.set_from(
        svc.support_vectors_,
        svc.dual_coef_,  # signed so that dual . K + intercept is decision_function
        gamma=float(svc._gamma),
        intercept=float(svc.intercept_[0]),
        a=float(sigmoid.a_),
        b=float(sigmoid.b_),
    )


def _fit_types(layer: nn.Linear, first: int, x, types: np.ndarray, c: float) -> None:
    """A multinomial logistic regression over the defective images whose type is known,
    copied into rows ``first..`` of ``layer``."""
    known = types >= 0
    present = np.unique(types[known])
    count = layer.out_features - first
    weight = np.zeros((count, x.shape[1]), np.float32)
    bias = np.full(count, ABSENT_TYPE_BIAS, np.float32)
    if len(present) == 1:
        bias[present[0]] = 0.0
    elif len(present) > 1:
        estimator = LogisticRegression(C=c, max_iter=MAX_ITERATIONS).fit(x[known], types[known])
        coef, intercept = estimator.coef_, estimator.intercept_
        if len(present) == 2:  # scikit-learn gives the second class's logit against the first
            coef = np.stack([np.zeros_like(coef[0]), coef[0]])
            intercept = np.array([0.0, intercept[0]])
        weight[estimator.classes_] = coef
        bias[estimator.classes_] = intercept
    _copy_rows(layer, first, weight, bias)


@torch.no_grad()
def _copy_rows(layer: nn.Linear, first: int, weight, bias) -> None:
    weight = torch.as_tensor(np.asarray(weight), dtype=layer.weight.dtype)
    bias = torch.as_tensor(np.asarray(bias), dtype=layer.bias.dtype).reshape(-1)
    layer.weight[first : first + len(weight)] = weight
    layer.bias[first : first + len(bias)] = bias
