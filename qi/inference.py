"""Decode -> preprocess -> score -> decide: what every consumer of a trained model runs.

The evaluation, ``qi predict``, the registry's champion comparison and the served pyfunc all
call these functions, so a model scores and decides the same way everywhere. The decision rule
itself is :func:`decide`: an image is defective when its defect probability reaches the
threshold.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

import qi
from qi.config import DetectorConfig, ModelConfig, from_dict
from qi.data.preprocessing import ImageDecodeError, PreprocessConfig, decode_image, preprocess
from qi.models import InspectionNet, build_model, has_frozen_encoder
from qi.models.ensemble import EnsembleNet, shared_encoder_groups
from qi.models.patchcore import PatchCoreNet, build_detector
from qi.models.weights import fit_state_dict

LABELS = ("ok", "defective")  # index = decision (0 ok, 1 defective)


def decide(probabilities: np.ndarray, threshold: float) -> np.ndarray:
    """1 (defective) where the defect probability reaches the threshold, else 0 (ok)."""
    return (np.asarray(probabilities) >= threshold).astype(int)


def label_names(decisions: np.ndarray) -> np.ndarray:
    return np.asarray(LABELS, dtype=object)[np.asarray(decisions, dtype=int)]


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that a trained model needs to score an image."""

    model: ModelConfig
    preprocess: PreprocessConfig
    threshold: float = 0.5
    qi_version: str = qi.__version__
    method: str = "classifier"  # "anomaly": a good-only detector (qi.models.patchcore)
    detector: DetectorConfig | None = None
    # the type head's classes in output order; () for a model that says whether only
    defect_types: tuple[str, ...] = ()
    # an ensemble (qi.models.ensemble): each member's spec and weight; () for one network
    ensemble: tuple[EnsembleMember, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: dict) -> ModelSpec:
        return cls(
            model=from_dict(ModelConfig, raw["model"]),
            preprocess=from_dict(PreprocessConfig, raw["preprocess"]),
            threshold=float(raw["threshold"]),
            qi_version=raw.get("qi_version", "?"),
            method=raw.get("method", "classifier"),  # models before detectors: classifiers
            detector=detector_of(raw["detector"]) if raw.get("detector") else None,
            defect_types=tuple(raw.get("defect_types", ())),  # models before types: none
            ensemble=tuple(  # models before ensembles: one network
                EnsembleMember(cls.from_dict(m["spec"]), float(m["weight"]))
                for m in raw.get("ensemble", ())
            ),
        )


def detector_of(raw: dict) -> DetectorConfig:
    """A spec's detector settings; those of detectors logged before zero padding keep the
    neighbourhood averaging they were fitted with."""
    return from_dict(DetectorConfig, {"zero_padding": False, **raw})


@dataclass(frozen=True)
class EnsembleMember:
    """One network of an ensemble: its own spec (model, views, types) and its weight."""

    spec: ModelSpec
    weight: float


def shared_encoder_key(spec: ModelSpec) -> tuple | None:
    """What a member's encoder is, when it stayed frozen at pretrained weights (a head on
    cached features): members with the same key have the same encoder and share its pass;
    ``None`` for an encoder that learned."""
    model = spec.model
    if not has_frozen_encoder(model):
        return None
    return (model.name, model.pretrained, spec.preprocess.channels)


def load_network(spec: ModelSpec, weights_file: Path) -> InspectionNet:
    """The network of ``spec`` with its trained weights (nothing is unpickled).

    A file without encoder weights holds a head trained on a frozen pretrained encoder (what a
    study keeps of such a trial): the encoder then comes from the pretrained weights the spec
    names, exactly as it was when the head was fitted.
    """
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    if spec.method == "anomaly":
        return load_detector(spec, state, weights_file)
    if spec.ensemble:
        return load_ensemble(spec, state, weights_file)
    head_only = not any(key.startswith("encoder.") for key in state)
    model = spec.model if head_only else replace(spec.model, pretrained=None)
    net = build_model(
        model, spec.preprocess.channels, spec.preprocess.image_size, spec.defect_types
    )
    state = encoder_in_current_layout(net, state, str(weights_file))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("encoder.") for key in missing):
        raise ValueError(
            f"{weights_file} does not fit a {spec.model.name} network: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    if missing and not head_only:
        raise ValueError(f"{weights_file} lacks encoder weights {missing[:3]}")
    return net.eval().to(memory_format=torch.channels_last)


def load_detector(spec: ModelSpec, state: dict, weights_file: Path) -> PatchCoreNet:
    """A good-only detector: its pruned encoder, memory bank and calibration, all in the file."""
    model = replace(spec.model, pretrained=None)
    bank = torch.zeros_like(state["memory_bank"])
    net = build_detector(model, spec.detector or DetectorConfig(), spec.preprocess.channels, bank)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit a {spec.model.name} detector: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net.eval()


def build_ensemble(spec: ModelSpec, members: list[InspectionNet]) -> EnsembleNet:
    """``members`` (one network per member of ``spec.ensemble``) as one ensemble, frozen
    encoders shared where the members' specs say they are the same."""
    keys = [shared_encoder_key(m.spec) for m in spec.ensemble]
    weights = [m.weight for m in spec.ensemble]
    return EnsembleNet(members, weights, shared_encoder_groups(keys)).eval()


def load_ensemble(spec: ModelSpec, state: dict, weights_file: Path) -> EnsembleNet:
    """An ensemble whose file holds every member whole (a shared encoder once: torch
    stores a tensor seen twice once)."""
    members = []
    for member in spec.ensemble:
        model = replace(member.spec.model, pretrained=None)  # the file has the weights
        net = build_model(
            model, spec.preprocess.channels, spec.preprocess.image_size, spec.defect_types
        )
        net.test_time_views = member.spec.model.test_time_views
        members.append(net)
    ensemble = build_ensemble(spec, members)
    missing, unexpected = ensemble.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not fit an ensemble of {len(members)}: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}"
        )
    return ensemble.eval().to(memory_format=torch.channels_last)


def encoder_in_current_layout(
    net: InspectionNet, state: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """A trained state with its encoder's tensors under ``net``'s names.

    Models logged before qi built its backbones with timm hold the encoder under the names of
    ``efficientnet-lite-pytorch`` or torchvision (``encoder.model._blocks.0...``): the same
    tensors in the same order, so they map by order, each shape checked
    (:func:`qi.models.weights.fit_state_dict`). A state in today's layout passes unchanged.
    """
    prefix = "encoder."
    theirs = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    ours = {k[len(prefix) :]: v for k, v in net.state_dict().items() if k.startswith(prefix)}
    if not theirs or theirs.keys() == ours.keys():
        return state
    mapped = fit_state_dict(theirs, ours, origin, leftover=0, network="its encoder")
    rest = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return rest | {prefix + k: v for k, v in mapped.items()}


def trained_state(net: InspectionNet) -> dict[str, torch.Tensor]:
    """What a trial must keep of its network: everything, or only the head (and the input
    normalisation) when the encoder stayed frozen at its pretrained weights."""
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    if getattr(net, "finetune", "all") == "head" and getattr(net, "pretrained", False):
        state = {k: v for k, v in state.items() if not k.startswith("encoder.")}
    return state


@torch.inference_mode()
def map_batches(
    function: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """``function`` over a preprocessed uint8 ``(N, H, W, C)`` array, ``batch_size`` images
    at a time as ``(B, C, H, W)`` tensors on ``device``; the outputs joined on the CPU.

    Every consumer of a network's per-image outputs (probabilities, a detector's raw scores,
    its anomaly maps) batches the same way, so memory stays bounded at any number of images.
    """
    outputs = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(images[start : start + batch_size]).permute(0, 3, 1, 2)
        chunk = chunk.to(device).contiguous(memory_format=torch.channels_last)
        outputs.append(function(chunk).float().cpu().numpy())
    return np.concatenate(outputs) if outputs else np.zeros(0, np.float32)


def defect_probabilities(net: InspectionNet, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Defect probability per image of a preprocessed uint8 (N, H, W, C) batch (averaged over
    the model's test-time views)."""
    device = next(net.parameters()).device
    return map_batches(net.probabilities, batch, batch_size, device)


def probabilities_and_types(
    net: InspectionNet, batch: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(defect probability ``(N,)``, type probabilities ``(N, K)`` over ``net.defect_types``)
    in one pass; ``K`` is 0 for a network that learned no types."""
    if not net.defect_types:
        probabilities = defect_probabilities(net, batch, batch_size)
        return probabilities, np.zeros((len(probabilities), 0), np.float32)
    device = next(net.parameters()).device

    def joined(images: torch.Tensor) -> torch.Tensor:
        defect, types = net.probabilities_and_types(images)
        return torch.cat([defect[:, None], types], dim=1)

    both = map_batches(joined, batch, batch_size, device).reshape(len(batch), -1)
    return both[:, 0], both[:, 1:]


def type_columns(
    decisions: np.ndarray, type_probabilities: np.ndarray, types: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """``defect_type`` and ``defect_type_probability`` per image: the most probable learned
    type of a part judged defective; an ok part has no type. Both are object arrays holding
    None for ok parts, so a REST answer carries ``null`` there (NaN is not JSON)."""
    best = type_probabilities.argmax(1)
    defective = np.asarray(decisions, dtype=bool)
    names = np.asarray(types, dtype=object)[best]
    chosen = type_probabilities[np.arange(len(best)), best].astype(np.float64)
    shares = np.empty(len(best), dtype=object)
    shares[:] = [float(p) if d else None for p, d in zip(chosen, defective, strict=True)]
    return {"defect_type": np.where(defective, names, None), "defect_type_probability": shares}


def prepare_batch(items: list, config: PreprocessConfig) -> np.ndarray:
    """Preprocess every item; an error names the row so one bad image shifts nothing.

    Items are encoded image bytes (or their base64 text) or uint8/uint16 arrays in RGB order.
    """
    out = np.empty((len(items), config.image_size, config.image_size, config.channels), np.uint8)
    for row, item in enumerate(items):
        try:
            out[row] = preprocess_item(item, config)
        except (ImageDecodeError, ValueError, cv2.error) as exc:  # binascii.Error is one too
            raise ValueError(f"row {row}: {exc}") from exc
    return out


def preprocess_item(item: Any, config: PreprocessConfig) -> np.ndarray:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return preprocess(decode_image(item), config, bgr=True)
    if isinstance(item, str):  # base64 text (REST clients)
        try:
            data = base64.b64decode("".join(item.split()), validate=True)
        except binascii.Error:
            raise ValueError(
                "text that is not base64: send an encoded image as base64, or its bytes"
            ) from None
        return preprocess(decode_image(data), config, bgr=True)
    if isinstance(item, np.ndarray):
        return preprocess(checked_array(item), config, bgr=False)
    raise ValueError(f"expected encoded image bytes or a uint8 array, got {type(item).__name__}")


def checked_array(image: np.ndarray) -> np.ndarray:
    """Arrays must say unambiguously what their pixels are: 8 or 16 bit integers."""
    if image.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"{image.dtype} array: send uint8 (or uint16) pixels; scale floats "
            "to 0..255 and convert with .astype(np.uint8)"
        )
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"image array of shape {image.shape}: expected (H, W) or (H, W, C) "
            "with 1, 3 or 4 channels"
        )
    return image


__all__ = [
    "LABELS",
    "ModelSpec",
    "checked_array",
    "decide",
    "defect_probabilities",
    "encoder_in_current_layout",
    "label_names",
    "load_network",
    "trained_state",
    "prepare_batch",
    "preprocess_item",
]
