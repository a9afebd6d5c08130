"""Features of a frozen encoder: cached once, keyed on pixels and weights, and what the
served network computes."""

import numpy as np
import pytest
import torch

from qi.config import ModelConfig
from qi.data import embeddings as cache
from qi.models import build_model


@pytest.fixture
def frozen_lite():
    return build_model(ModelConfig(name="efficientnet_lite0", finetune="head"), 1, 64)


def _images(seed: int, n: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 1), dtype=np.uint8)


def test_features_are_computed_once_and_keyed_on_pixels_and_weights(frozen_lite, session_cache):
    images = _images(0)
    first = cache.embeddings(frozen_lite, images, views=2, progress=False)
    assert first.shape == (2, 5, frozen_lite.encoder.feature_dim)
    files = sorted((session_cache / "embeddings").glob("*.npy"))
    again = cache.embeddings(frozen_lite, images, views=2, progress=False)
    assert np.array_equal(first, again)
    assert sorted((session_cache / "embeddings").glob("*.npy")) == files  # nothing new
    # other pixels (another preprocessing) or other weights: never the cached features
    other_pixels = cache.embeddings(frozen_lite, _images(1), views=1, progress=False)
    assert not np.allclose(other_pixels[0], first[0])
    with torch.no_grad():
        frozen_lite.encoder.model.conv_head.weight.mul_(1.5)
    other_weights = cache.embeddings(frozen_lite, images, views=1, progress=False)
    assert not np.allclose(other_weights[0], first[0])
    assert len(list((session_cache / "embeddings").glob("*.npy"))) == len(files) + 2


def test_views_are_the_flips_and_rotations_the_network_sees(frozen_lite):
    images = _images(2, n=3)
    features = cache.embeddings(frozen_lite, images, views=8, progress=False)
    frozen_lite.eval()
    with torch.no_grad():
        rotated = torch.from_numpy(images).permute(0, 3, 1, 2).transpose(-1, -2)  # view 4
        direct = frozen_lite.embed(rotated).numpy()
    assert np.allclose(features[4], direct, rtol=2e-3, atol=2e-3)  # stored as float16


def test_trials_that_differ_in_pooling_share_one_pass_of_the_encoder(session_cache):
    images = _images(3)
    both = build_model(ModelConfig(name="efficientnet_lite0", finetune="head"), 1, 64)
    features = cache.embeddings(both, images, views=1, progress=False)
    files = set((session_cache / "embeddings").glob("*.npy"))
    for kind, part in (("avg", slice(None, 1280)), ("max", slice(1280, None))):
        single = build_model(
            ModelConfig(name="efficientnet_lite0", finetune="head", pooling=kind), 1, 64
        )
        pooled = cache.embeddings(single, images, views=1, progress=False)
        assert pooled.shape[-1] == single.encoder.feature_dim == 1280
        assert np.array_equal(pooled, features[..., part])
    assert set((session_cache / "embeddings").glob("*.npy")) == files


def test_trials_that_differ_in_stages_share_one_pass_and_see_what_the_network_computes(
    session_cache,
):
    images = _images(4, n=3)
    last_only = build_model(ModelConfig(name="efficientnet_lite0", finetune="head"), 1, 64)
    cache.embeddings(last_only, images, views=1, progress=False)
    files = set((session_cache / "embeddings").glob("*.npy"))
    config = ModelConfig(name="efficientnet_lite0", finetune="head", feature_stages=(16, 32))
    staged = build_model(config, 1, 64).eval()
    features = cache.embeddings(staged, images, views=1, progress=False)
    assert set((session_cache / "embeddings").glob("*.npy")) == files  # the same pass
    # the last map's avg and max, then the 112- and 320-channel stages' (Lite0 strides 16, 32)
    assert features.shape[-1] == staged.encoder.feature_dim == 2 * (1280 + 112 + 320)
    with torch.no_grad():
        direct = staged.embed(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.allclose(features[0], direct, rtol=2e-3, atol=2e-3)  # stored as float16
    assert np.array_equal(features[0, :, :2560], cache.embeddings(last_only, images, 1)[0])


def test_evaluation_reads_validation_from_the_cache_and_scores_test_through_the_network(
    frozen_lite, tmp_path
):
    """The study's final evaluation: validation (where the threshold is chosen) as the trials
    scored it, from the cache; the test split through the whole network, as it serves."""
    import pandas as pd

    from qi.data.datamodule import PreparedData
    from qi.data.preprocessing import PreprocessConfig
    from qi.evaluation.scoring import evaluate, validation_probabilities
    from qi.inference import defect_probabilities

    images = _images(3, n=10)
    split = ["val"] * 4 + ["test"] * 6
    frame = pd.DataFrame(
        {
            "image_path": [str(tmp_path / f"{i}.png") for i in range(10)],
            "label": [0, 1] * 5,
            "defect_type": [""] * 10,
            "split": split,
        }
    )
    data = PreparedData(frame, images, tmp_path, "folders", "ok", PreprocessConfig(64))
    frozen_lite.eval()
    frozen_lite.test_time_views = 2
    cache.embeddings(frozen_lite, images[:4], views=2, progress=False)  # as a trial left it
    encoded = []
    frozen_lite.encoder.register_forward_hook(lambda m, args, out: encoded.append(len(out)))
    evaluation = evaluate(frozen_lite, data, target_recall=None, threshold=0.5)
    assert sum(encoded) == 6 * 2  # the test images' two views, nothing of validation
    encoded.clear()
    cached = validation_probabilities(frozen_lite, images[:4])
    direct = defect_probabilities(frozen_lite, images[:4])
    assert sum(encoded) == 4 * 2  # (the direct pass)
    assert np.allclose(cached, direct, atol=2e-3)  # features stored as float16
    assert evaluation.val_false_alarms == pytest.approx(np.mean(cached[[0, 2]] >= 0.5))
