"""The deployable model: an MLflow pyfunc that takes raw images and returns decisions.

The model carries its preprocessing (the same :func:`qi.data.preprocessing.preprocess` that
training used, shipped as code with the model), its architecture as JSON, its weights as a
plain state dict (loaded with ``weights_only=True``: nothing is unpickled) and its decision
threshold. Callers send images, never tensors:

* a DataFrame with a column ``image`` of encoded PNG/JPEG/BMP/TIFF bytes (over REST: base64);
* or, from Python, a uint8 array ``(N, H, W)`` / ``(N, H, W, C)`` (colour arrays in RGB order).
"""

from __future__ import annotations

import io
import json
import tempfile
import warnings
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
            elif isinstance(item, str):
                import base64

                image, bgr = decode_image(base64.b64decode(item, validate=True)), True
            else:
                image, bgr = np.asarray(item), False
            out[row] = preprocess(image, config, bgr=bgr)
        except (ImageDecodeError, ValueError, cv2.error) as exc:
            raise ValueError(f"row {row}: {exc}") from exc
    return out


# qi validates its own inputs; MLflow's nudge to add predict type hints does not apply
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")


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
        with warnings.catch_warnings():
            # qi validates inputs itself; MLflow's type-hint validation does not fit images
            warnings.filterwarnings("ignore", ".*type hints to the `predict` method.*")
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
