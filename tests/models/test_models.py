import pytest
import torch

from qi.config import ModelConfig
from qi.models import build_model, model_names
from qi.models.backbones import WeightsNotFoundError, hub_checkpoint_path


@pytest.mark.parametrize("name", ["cnn", "resnet18", "efficientnet_b0", "mobilenet_v3_small"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_model_gives_one_logit_per_image(name, channels):
    net = build_model(ModelConfig(name=name, depth=3, width=8), channels).eval()
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
    assert torch.all(net.body.layer1[0].conv1.weight == 0.125)
    # the grayscale stem is the sum of the RGB filters
    expected = planted.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(net.body.conv1.weight, expected)
    assert net.body.fc[-1].out_features == 1


def test_weights_from_an_explicit_file(tmp_path):
    from torchvision.models import mobilenet_v3_small

    planted = mobilenet_v3_small(weights=None)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": planted.state_dict()}, path)
    net = build_model(ModelConfig(name="mobilenet_v3_small", pretrained=str(path)), 3)
    assert torch.equal(net.body.features[0][0].weight, planted.features[0][0].weight)
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_model(ModelConfig(name="resnet18", pretrained=str(tmp_path / "missing.pth")), 3)
    with pytest.raises(ValueError, match="does not fit resnet18"):
        build_model(ModelConfig(name="resnet18", pretrained=str(path)), 3)
