"""Heads fitted by scikit-learn (--head-kind logistic, svm): the torch layers they are copied
into answer exactly as the estimators do, load from tensors alone and export to ONNX."""

from dataclasses import replace

import numpy as np
import onnxruntime
import pytest
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.svm import SVC

from qi.config import ModelConfig
from qi.fit.estimators import fit_estimator_head, fitted_by_scikit_learn, svm_fit_seconds
from qi.models.parts import build_head

VIEWS, IMAGES, DIM, TYPES = 2, 120, 16, 3


@pytest.fixture(scope="module")
def features():
    """Two views of 120 images: defective ones shifted, each with one of 3 types."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, IMAGES)
    types = np.where(labels == 1, rng.integers(0, TYPES, IMAGES), -1)
    x = rng.normal(size=(VIEWS, IMAGES, DIM)) + labels[None, :, None] * 0.7
    x[..., 1] += types * 1.5  # the types are separable along one feature
    targets = np.stack([labels, types], axis=1).astype(np.float32)
    return x.astype(np.float32), targets


def fitted(kind: str, features) -> torch.nn.Module:
    x, targets = features
    head = build_head(DIM, 0.2, hidden=256, outputs=1 + TYPES, kind=kind)
    fit_estimator_head(head, x, targets, ModelConfig(head_kind=kind, head_c=1.0), balance=True)
    return head.eval()


def standardised(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1, DIM)
    return (flat - flat.mean(0)) / flat.std(0, ddof=1)


def reference(kind: str, features) -> np.ndarray:
    """scikit-learn's own defect probabilities, on the same standardised training copies."""
    x, targets = features
    z = standardised(x)
    labels = np.tile(targets[:, 0].astype(int), VIEWS)
    if kind == "logistic":
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    else:
        groups = np.tile(np.arange(IMAGES), VIEWS)
        model = CalibratedClassifierCV(
            SVC(C=1.0, gamma="scale", class_weight="balanced"),
            method="sigmoid",
            cv=list(GroupKFold(3).split(z, labels, groups)),
            ensemble=False,
        )
    return model.fit(z, labels).predict_proba(z)[:, 1]


@pytest.mark.parametrize("kind", ["logistic", "svm"])
def test_an_estimator_head_answers_as_its_estimator_and_loads_from_tensors(kind, features):
    head = fitted(kind, features)
    x, targets = features
    flat = torch.from_numpy(x.reshape(-1, DIM))
    with torch.no_grad():
        logits = head(flat)
    assert logits.shape == (VIEWS * IMAGES, 1 + TYPES)
    np.testing.assert_allclose(
        torch.sigmoid(logits[:, 0]).numpy(), reference(kind, features), atol=1e-5
    )
    # the types: scikit-learn's multinomial regression over the defective images' types
    types = np.tile(targets[:, 1], VIEWS).astype(int)
    known = types >= 0
    z = standardised(x)
    expected = LogisticRegression(C=1.0, max_iter=2000).fit(z[known], types[known])
    np.testing.assert_allclose(
        torch.softmax(logits[:, 1:], dim=1).numpy(), expected.predict_proba(z), atol=1e-5
    )
    # a head built anew (as a registered model is loaded) takes the state: tensors only
    state = head.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = build_head(DIM, 0.2, hidden=256, outputs=1 + TYPES, kind=kind).eval()
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again(flat), logits)


def test_an_svm_head_exports_to_onnx_with_the_same_answers(features, tmp_path):
    head = fitted("svm", features)
    flat = torch.from_numpy(features[0][0])
    path = tmp_path / "head.onnx"
    torch.onnx.export(
        head, (flat,), str(path), input_names=["x"], dynamic_axes={"x": {0: "n"}}, dynamo=False
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (exported,) = session.run(None, {"x": flat.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(exported, head(flat).numpy(), atol=1e-4)


def test_an_estimator_head_needs_both_classes(features):
    x, targets = features
    good = targets[:, 0] == 0
    head = build_head(DIM, 0.0, outputs=1, kind="logistic")
    with pytest.raises(ValueError, match="good and defective"):
        fit_estimator_head(
            head, x[:, good], targets[good, 0], ModelConfig(head_kind="logistic"), True
        )


def test_which_heads_scikit_learn_fits_and_what_a_deadline_weighs():
    """A study does not start an svm fit its deadline would cut (it cannot stop half-way):
    the expected seconds grow with the training copies up to the sampled maximum."""
    frozen = ModelConfig(name="efficientnet_lite0", finetune="head")
    assert fitted_by_scikit_learn(replace(frozen, head_kind="svm"))
    assert fitted_by_scikit_learn(replace(frozen, head_kind="logistic"))
    assert not fitted_by_scikit_learn(frozen)  # mlp: Lightning's epochs
    assert not fitted_by_scikit_learn(replace(frozen, head_kind="svm", finetune="all"))
    assert not fitted_by_scikit_learn(ModelConfig(name="cnn", head_kind="svm"))
    assert svm_fit_seconds(100) < svm_fit_seconds(644) < svm_fit_seconds(10_000)
    assert svm_fit_seconds(10_000) == svm_fit_seconds(100_000)  # sampled beyond the maximum
    assert 20 < svm_fit_seconds(644) < 60  # ELPV mono's 644 training cells: 38 s measured
