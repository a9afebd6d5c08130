"""The deployable model: an MLflow pyfunc that takes raw images and returns decisions.

The model carries its preprocessing (the same :func:`qi.data.preprocessing.preprocess` that
training used, shipped as code with the model), its architecture as JSON, its weights as a
plain state dict (loaded with ``weights_only=True``: nothing is unpickled) and its decision
threshold. Callers send images, never tensors: a DataFrame with one column ``image`` whose
cells are either

* encoded PNG/JPEG/BMP/TIFF bytes (over REST: base64 strings, which MLflow decodes), or
* uint8/uint16 arrays ``(H, W)`` or ``(H, W, C)`` of any size (colour in RGB order).

MLflow enforces the signature before the model sees its input, and one signature cannot be both
a DataFrame and a tensor, so a batch array or a list goes through :func:`as_model_input` first.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch

import qi
from qi.config import ModelConfig
from qi.data.preprocessing import ImageDecodeError, PreprocessConfig, decode_image, preprocess
from qi.models import InspectionNet, build_model

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"
SPEC_ARTIFACT = "spec"
LABELS = ("ok", "defective")


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights that the served model needs."""

    model: ModelConfig
    preprocess: PreprocessConfig
    threshold: float = 0.5
    qi_version: str = qi.__version__

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        raw = json.loads(text)
        return cls(
            model=ModelConfig(**raw["model"]),
            preprocess=PreprocessConfig(**raw["preprocess"]),
            threshold=float(raw["threshold"]),
            qi_version=raw.get("qi_version", "?"),
        )


def as_model_input(images: Any) -> pd.DataFrame:
    """A batch array ``(N, H, W[, C])``, a list of arrays or bytes, or one image -> the
    DataFrame the served model takes (``model.predict(as_model_input(batch))``)."""
    if isinstance(images, pd.DataFrame):
        return images
    if isinstance(images, (bytes, bytearray)):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"image batch must be (N, H, W) or (N, H, W, C), got {images.shape}")
        images = list(images)
    return pd.DataFrame({IMAGE_COLUMN: list(images)})


def _images_from_input(model_input: Any) -> list[np.ndarray | bytes]:
    """Split a pyfunc input into per-image items; raw bytes are decoded later, per row."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ValueError(
                f"input DataFrame needs a column '{IMAGE_COLUMN}' of encoded image "
                f"bytes; got columns {list(model_input.columns)}"
            )
        return list(model_input[IMAGE_COLUMN])
    if isinstance(model_input, np.ndarray):
        if model_input.ndim in (3, 4):
            return list(model_input)
        raise ValueError(f"image array must be (N, H, W) or (N, H, W, C), got {model_input.shape}")
    if isinstance(model_input, list):
        return model_input
    raise ValueError(f"unsupported input type {type(model_input).__name__}")


def prepare_batch(items: list, config: PreprocessConfig) -> np.ndarray:
    """Preprocess every item; an error names the row so one bad image shifts nothing."""
    out = np.empty((len(items), config.image_size, config.image_size, config.channels), np.uint8)
    for row, item in enumerate(items):
        try:
            if isinstance(item, (bytes, bytearray, memoryview)):
                image, bgr = decode_image(item), True
            elif isinstance(item, str):  # base64 that MLflow did not decode (AnyType clients)
                image, bgr = decode_image(base64.b64decode(item, validate=True)), True
            elif isinstance(item, np.ndarray):
                image, bgr = _checked_array(item), False
            else:
                raise ValueError(
                    f"expected encoded image bytes or a uint8 array, got {type(item).__name__}"
                )
            out[row] = preprocess(image, config, bgr=bgr)
        except (ImageDecodeError, ValueError, cv2.error) as exc:  # binascii.Error is one too
            raise ValueError(f"row {row}: {exc}") from exc
    return out


def _checked_array(image: np.ndarray) -> np.ndarray:
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


class InspectionModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: validate, preprocess, score, threshold."""

    def load_context(self, context) -> None:
        self.spec = ModelSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        self.net = load_network(self.spec, Path(context.artifacts[WEIGHTS_ARTIFACT]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        requested = (params or {}).get("threshold")
        threshold = self.spec.threshold if requested is None else float(requested)
        batch = prepare_batch(_images_from_input(model_input), self.spec.preprocess)
        probabilities = defect_probabilities(self.net, batch)
        return pd.DataFrame(
            {
                "label": np.where(probabilities >= threshold, LABELS[1], LABELS[0]),
                "defect_probability": probabilities.astype(np.float64),
                "threshold": threshold,
            }
        )


def load_network(spec: ModelSpec, weights_file: Path) -> InspectionNet:
    net = build_model(
        ModelConfig(**{**asdict(spec.model), "pretrained": None}), spec.preprocess.channels
    )
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def defect_probabilities(net: InspectionNet, batch: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Defect probability per image of a preprocessed uint8 (N, H, W, C) batch."""
    device = next(net.parameters()).device
    scores = []
    for start in range(0, len(batch), batch_size):
        chunk = torch.from_numpy(batch[start : start + batch_size]).permute(0, 3, 1, 2)
        chunk = chunk.to(device).contiguous(memory_format=torch.channels_last)
        scores.append(torch.sigmoid(net(chunk).float()).cpu().numpy())
    return np.concatenate(scores) if scores else np.zeros(0, np.float32)


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("could not encode image as PNG")
    return buffer.tobytes()


def _signature(threshold: float) -> mlflow.models.ModelSignature:
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return mlflow.models.ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "defect_probability"),
                ColSpec("double", "threshold"),
            ]
        ),
        params=ParamSchema([ParamSpec("threshold", "double", threshold)]),
    )


def pip_requirements() -> list[str]:
    """Pinned versions of what the served model imports (not the training stack)."""
    from importlib.metadata import version

    names = ["torch", "torchvision", "opencv-python-headless", "numpy", "pandas", "mlflow"]
    return [f"{name}=={version(name)}" for name in names]


def log_inspection_model(
    net: InspectionNet, spec: ModelSpec, example_image: np.ndarray, name: str = "model"
) -> mlflow.models.model.ModelInfo:
    """Log the pyfunc model to the active run; returns MLflow's ModelInfo."""
    example = pd.DataFrame({IMAGE_COLUMN: [encode_png(example_image)]})
    with tempfile.TemporaryDirectory(prefix="qi-model-") as tmp:
        weights = Path(tmp) / "weights.pt"
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buffer)
        weights.write_bytes(buffer.getvalue())
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(spec.to_json())
        return _log_pyfunc(weights, spec_file, spec, example, name)


def _log_pyfunc(
    weights: Path, spec_file: Path, spec: ModelSpec, example: pd.DataFrame, name: str
) -> mlflow.models.model.ModelInfo:
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec_file)},
        code_paths=[str(Path(qi.__file__).parent)],
        signature=_signature(spec.threshold),
        input_example=example,
        pip_requirements=pip_requirements(),
    )
