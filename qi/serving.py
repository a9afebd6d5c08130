"""The deployable model: an MLflow pyfunc that takes raw images and returns decisions.

The model carries its preprocessing (the same :mod:`qi.inference` and
:func:`qi.data.preprocessing.preprocess` code that training and evaluation use, shipped as
code with the model), its architecture as JSON, its weights as a plain state dict (loaded with
``weights_only=True``: nothing is unpickled) and its decision threshold. Callers send images,
never tensors: a DataFrame with one column ``image`` whose cells are either

* encoded PNG/JPEG/BMP/TIFF bytes (over REST: base64 strings, which MLflow decodes), or
* uint8/uint16 arrays ``(H, W)`` or ``(H, W, C)`` of any size (colour in RGB order).

MLflow enforces the signature before the model sees its input, and one signature cannot be both
a DataFrame and a tensor, so a batch array or a list goes through :func:`as_model_input` first.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch

import qi
from qi.inference import (
    ModelSpec,
    decide,
    defect_probabilities,
    label_names,
    load_network,
    prepare_batch,
)
from qi.models import InspectionNet

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"
SPEC_ARTIFACT = "spec"


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


class InspectionModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper over :mod:`qi.inference`: validate, preprocess, score, decide."""

    def load_context(self, context) -> None:
        from qi.runtime import keep_freed_memory

        keep_freed_memory()  # a served model owns its process: 2-3x faster CPU inference
        self.spec = ModelSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
        self.net = load_network(self.spec, Path(context.artifacts[WEIGHTS_ARTIFACT]))

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> pd.DataFrame:
        requested = (params or {}).get("threshold")
        threshold = self.spec.threshold if requested is None else float(requested)
        batch = prepare_batch(_images_from_input(model_input), self.spec.preprocess)
        probabilities = defect_probabilities(self.net, batch)
        return pd.DataFrame(
            {
                "label": label_names(decide(probabilities, threshold)),
                "defect_probability": probabilities.astype(np.float64),
                "threshold": threshold,
            }
        )


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
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "torch",
        "torchvision",
        "efficientnet-lite-pytorch",  # the architecture; the weights travel with the model
        "opencv-python-headless",
        "pillow",
        "numpy",
        "pandas",
        "mlflow",
    ]
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:  # e.g. mlflow-skinny in place of mlflow
            if name == "mlflow":
                pins.append(f"mlflow-skinny=={version('mlflow-skinny')}")
            else:
                raise
    return pins


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
