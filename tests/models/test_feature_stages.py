"""Multi-stage features: intermediate stages' pooled maps beside the last one, exported whole."""

import numpy as np
import onnxruntime
import pytest
import torch

from qi.config import ModelConfig
from qi.data.preprocessing import PreprocessConfig
from qi.export import write_onnx
from qi.inference import ModelSpec
from qi.models import build_model


def _config(**overrides) -> ModelConfig:
    return ModelConfig(
        name="efficientnet_lite0", finetune="head", feature_stages=(16, 32), **overrides
    )


@pytest.mark.parametrize(
    ("name", "stages", "width"),
    [
        ("efficientnet_lite0", (16, 32), 1280 + 112 + 320),  # the head conv follows stride 32
        ("resnet18", (16, 32), 512 + 256),  # its stride 32 stage is the last map: left out
        ("mobilenet_v3_small", (8,), 576 + 24),
    ],
)
def test_the_feature_vector_is_the_last_map_then_each_chosen_stage(name, stages, width):
    for pooling, factor in (("avgmax", 2), ("max", 1)):
        config = ModelConfig(name=name, pretrained="none", pooling=pooling, feature_stages=stages)
        net = build_model(config, 3, 64).eval()
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        with torch.no_grad():
            features = net.embed(images)
            normalised = (images - net.mean) / net.std
            last = net.encoder.pool(net.encoder.model.forward_features(normalised))
        assert features.shape == (2, width * factor) and net.encoder.feature_dim == width * factor
        assert torch.equal(features[:, : last.shape[1]], last)


def test_a_stride_the_encoder_lacks_or_a_cnn_is_one_line():
    with pytest.raises(ValueError, match="no stage of stride 12: choose --feature-stages among"):
        build_model(ModelConfig(name="efficientnet_lite0", feature_stages=(12,)), 3, 64)
    with pytest.raises(ValueError, match="--feature-stages needs a pretrained backbone"):
        build_model(ModelConfig(name="cnn", feature_stages=(16,)), 3, 64)
    with pytest.raises(ValueError, match="positive strides"):
        ModelConfig(feature_stages=(0,))


def test_a_model_reading_stages_exports_to_onnx_with_parity(tmp_path):
    torch.manual_seed(0)
    net = build_model(_config(test_time_views=2), 1, 64).eval()
    spec = ModelSpec(model=_config(test_time_views=2), preprocess=PreprocessConfig(image_size=64))
    path = tmp_path / "model.onnx"
    write_onnx(net, spec, path, "runs:/test/model")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 1), dtype=np.uint8)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exported = session.run(None, {"image": images})[0]
    with torch.no_grad():
        served = net.probabilities(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    assert np.allclose(exported, served, atol=1e-4)
