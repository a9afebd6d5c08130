"""Ensembles: one network's interface, one encoder pass for heads that share an encoder,
saved and loaded through the spec, exported to ONNX with parity; Caruana's selection."""

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from qi.config import ModelConfig
from qi.data.preprocessing import PreprocessConfig
from qi.inference import EnsembleMember, ModelSpec, build_ensemble, load_network
from qi.models import build_model
from qi.models.ensemble import shared_encoder_groups
from qi.study.ensemble import clipped_log_loss, forward_selection

PRE = PreprocessConfig(image_size=64, color_mode="gray")
HEAD = ModelConfig(name="efficientnet_lite0", finetune="head", pooling="avgmax")


def _members(views: int = 8):
    """Two heads on the same frozen encoder (one reading an extra stage, another with 2
    views), and a CNN: what a study's best trials look like."""
    torch.manual_seed(0)
    configs = [
        replace(HEAD, test_time_views=views),
        replace(HEAD, head_hidden=16, feature_stages=(16,), test_time_views=2),
        ModelConfig(name="cnn", depth=2, width=8, test_time_views=1),
    ]
    nets = []
    for config in configs:
        net = build_model(config, 1, 64).eval()
        for p in net.head.parameters():  # heads of different trials
            torch.nn.init.normal_(p, std=0.05)
        nets.append(net)
    specs = [ModelSpec(c, PRE) for c in configs]
    return nets, specs


def _spec(specs, weights):
    members = tuple(EnsembleMember(s, w) for s, w in zip(specs, weights, strict=True))
    return replace(specs[0], ensemble=members)


def test_shared_encoder_groups_keep_learned_encoders_alone():
    assert shared_encoder_groups([("a",), None, ("a",), ("b",)]) == [[0, 2], [1], [3]]


def test_ensemble_is_the_weighted_mean_of_its_members_with_one_encoder_pass(tmp_path):
    nets, specs = _members()
    images = torch.randint(0, 256, (3, 1, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        alone = [n.probabilities(images) for n in nets]
    spec = _spec(specs, [0.5, 0.25, 0.25])
    ensemble = build_ensemble(spec, nets)
    assert ensemble.groups == [[0, 1], [2]]
    assert ensemble.members[1].encoder.model is ensemble.members[0].encoder.model
    calls = []
    stem = ensemble.members[0].encoder.model.conv_stem
    hook = stem.register_forward_hook(lambda *a: calls.append(1))
    with torch.inference_mode():
        together = ensemble.probabilities(images)
    hook.remove()
    expected = 0.5 * alone[0] + 0.25 * alone[1] + 0.25 * alone[2]
    torch.testing.assert_close(together, expected, atol=1e-5, rtol=1e-4)
    # the shared encoder ran once per view of its most-viewed member, not once per member
    assert len(calls) == 8

    # saved whole and loaded from the spec alone (its JSON): the same answers
    path = tmp_path / "weights.pt"
    torch.save(ensemble.state_dict(), path)
    loaded = load_network(ModelSpec.from_json(spec.to_json()), path)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.probabilities(images), together, atol=1e-6, rtol=0)
    # the shared encoder's weights are stored once
    single = tmp_path / "one.pt"
    torch.save(nets[2].state_dict(), single)
    encoder = sum(p.numel() for p in nets[0].encoder.parameters()) * 4
    assert path.stat().st_size < 1.5 * encoder + 10 * single.stat().st_size


def test_forward_reads_one_view_per_member_as_a_single_network_does():
    """Grad-CAM differentiates forward: the image as it is, not every test-time view."""
    nets, specs = _members()
    images = torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        alone = [torch.sigmoid(n(images)) for n in nets]
        ensemble = build_ensemble(_spec(specs, [0.5, 0.25, 0.25]), nets)
        logit = ensemble(images)
    expected = 0.5 * alone[0] + 0.25 * alone[1] + 0.25 * alone[2]
    torch.testing.assert_close(torch.sigmoid(logit), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ensemble_exports_to_onnx_with_parity(tmp_path):
    import onnxruntime

    from qi.export import write_onnx

    nets, specs = _members(views=2)  # every view is the encoder again in the graph
    spec = _spec(specs, [0.6, 0.2, 0.2])
    ensemble = build_ensemble(spec, nets)
    write_onnx(ensemble, spec, tmp_path / "model.onnx", "test")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    pixels = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 1), dtype=np.uint8)
    (onnx_scores,) = session.run(None, {"image": pixels})
    with torch.inference_mode():
        torch_scores = ensemble.probabilities(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    np.testing.assert_allclose(onnx_scores, torch_scores.numpy(), atol=1e-5)


def test_ensemble_heatmaps_average_its_encoders():
    from qi.heatmaps import heatmaps

    nets, specs = _members()
    ensemble = build_ensemble(_spec(specs, [0.5, 0.25, 0.25]), nets)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 1), dtype=np.uint8)
    maps = heatmaps(ensemble, pixels)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all()


def test_members_with_other_types_do_not_ensemble():
    nets, specs = _members()
    typed = build_model(HEAD, 1, 64, defect_types=("crack", "hole"))
    with pytest.raises(ValueError, match="different defect types"):
        build_ensemble(_spec([specs[0], specs[0]], [0.5, 0.5]), [nets[0], typed])


def test_forward_selection_finds_complementary_models():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    truth = labels.astype(float)
    # two models each right on a different half, a third one weak everywhere
    half = np.arange(400) < 200
    a = np.where(half, 0.9 * truth + 0.05, 0.5 + 0.1 * rng.standard_normal(400))
    b = np.where(~half, 0.9 * truth + 0.05, 0.5 + 0.1 * rng.standard_normal(400))
    c = np.clip(0.5 + 0.2 * (truth - 0.5) + 0.1 * rng.standard_normal(400), 0.01, 0.99)
    picks, loss = forward_selection(labels, {1: a, 2: b, 3: c})
    assert set(picks) >= {1, 2} and picks[3] <= 1
    assert loss < min(clipped_log_loss(labels, p) for p in (a, b, c))


def test_forward_selection_of_one_good_model_keeps_it_alone():
    labels = np.array([0, 1] * 50)
    good = np.where(labels == 1, 0.9, 0.1)
    bad = np.full(100, 0.5)
    picks, loss = forward_selection(labels, {7: good, 8: bad})
    assert picks == Counter({7: 1}) and loss == pytest.approx(clipped_log_loss(labels, good))
