"""The deployable model: an MLflow pyfunc that takes raw images and returns decisions.

The model carries its preprocessing (the same :mod:`qi.inference` and
:func:`qi.data.preprocessing.preprocess` code that training and evaluation use, shipped as
code with the model), its architecture as JSON, its weights as a plain state dict (loaded with
``weights_only=True``: nothing is unpickled) and its decision threshold.

``predict`` takes what callers naturally have, without helpers: a uint8/uint16 batch array
``(N, H, W)`` or ``(N, H, W, C)``, one image array ``(H, W)`` or ``(H, W, 3|4)``, a list of
arrays of any sizes or of encoded PNG/JPEG/BMP/TIFF bytes, a DataFrame with an ``image``
column, and over REST ``dataframe_split`` / ``dataframe_records`` with base64 strings and
``instances`` / ``inputs`` with ``{"b64": ...}`` objects. Colour arrays are RGB.

Why the signature declares outputs and params but no input schema: MLflow enforces an input
schema before the model sees the data, and a column schema makes a DataFrame of whatever
comes (``pd.DataFrame`` refuses an ``(N, H, W)`` batch: "Must pass 2-d input"); a signature
taken from type hints makes the scoring server refuse ``dataframe_split``. So the model checks
its input itself: a bad row fails the whole call with a one-line message naming the row and
what is wrong, which the scoring server returns as HTTP 400. The logged input example shows
the REST form on the model's page.
"""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import cv2
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

import qi
from qi.inference import (
    ModelSpec,
    decide,
    label_names,
    load_network,
    prepare_batch,
    probabilities_and_types,
    type_columns,
)
from qi.models import InspectionNet
from qi.tags import Artifact

IMAGE_COLUMN = "image"
WEIGHTS_ARTIFACT = "weights"
SPEC_ARTIFACT = "spec"


class InvalidImageInput(MlflowException):
    """Images a request sent that cannot be scored: HTTP 400, ``message`` naming the row.

    MLflow's scoring server rewrites a model's MlflowException message as ``Failed to predict
    data '<the whole input>'. Error: ...`` (for images: pages of base64). The message set when
    the error is raised is kept as it is, so the client reads the row and what is wrong.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._row_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_row_message"):  # set once, by __init__
            self._row_message = value


def as_model_input(images: Any) -> pd.DataFrame:
    """A batch array ``(N, H, W[, C])``, a list of arrays or bytes, or one image -> a
    DataFrame with an ``image`` column. No longer needed: ``predict`` takes these directly."""
    if isinstance(images, pd.DataFrame):
        return images
    if isinstance(images, (bytes, bytearray)):
        images = [images]
    elif isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(f"image batch must be (N, H, W) or (N, H, W, C), got {images.shape}")
        images = list(images)
    return pd.DataFrame({IMAGE_COLUMN: list(images)})


def images_from_input(model_input: Any) -> list:
    """Every form ``predict`` accepts -> one item per image (encoded bytes, base64 text or a
    pixel array), checked per row later. Raises ValueError naming what is wrong."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN in model_input.columns:
            return [_item(cell) for cell in model_input[IMAGE_COLUMN]]
        if "b64" in model_input.columns:  # TF-serving style rows: {"b64": "..."}
            return [str(cell) for cell in model_input["b64"]]
        raise ValueError(
            f"the input table needs a column '{IMAGE_COLUMN}' of images; got columns "
            f"{list(model_input.columns)}"
        )
    if isinstance(model_input, dict):
        if "b64" in model_input and len(model_input) == 1:
            value = model_input["b64"]
            values = value if isinstance(value, (list, np.ndarray)) else [value]
            return [str(_item(v)) for v in values]
        if IMAGE_COLUMN not in model_input:
            raise ValueError(
                f"the input needs the key '{IMAGE_COLUMN}'; got keys {list(model_input)}"
            )
        return images_from_input(model_input[IMAGE_COLUMN])
    if isinstance(model_input, (bytes, bytearray, memoryview, str)):
        return [_item(model_input)]
    if isinstance(model_input, np.ndarray):
        return _items_of_array(model_input)
    if isinstance(model_input, (list, tuple, pd.Series)):
        return [_item(cell) for cell in model_input]
    raise ValueError(
        f"cannot read images from a {type(model_input).__name__}: send an image array, a "
        f"batch array, a list of arrays or encoded bytes, or a table with a column "
        f"'{IMAGE_COLUMN}'"
    )


def _items_of_array(array: np.ndarray) -> list:
    if array.dtype == object or array.dtype.kind in "SU":  # an array of cells
        return [_item(cell) for cell in array.reshape(-1)]
    if array.ndim == 1 and array.dtype == np.uint8:  # the bytes of an encoded file
        return [array.tobytes()]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4)):
        return [_item(array)]  # one image: (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA
    if array.ndim in (3, 4):
        return [_item(image) for image in array]  # a batch: (N, H, W) or (N, H, W, C)
    raise ValueError(
        f"{array.ndim}-D array of shape {array.shape}: send one image (H, W) or (H, W, C), "
        "or a batch (N, H, W) or (N, H, W, C)"
    )


def _item(cell: Any) -> Any:
    """One image as its caller sent it, with the wrappers of JSON clients taken off."""
    if isinstance(cell, np.ndarray) and cell.ndim == 0:  # how MLflow wraps JSON objects
        cell = cell.item()
    if isinstance(cell, dict):
        if "b64" not in cell:
            raise ValueError(f"an image object needs the key 'b64'; got keys {list(cell)}")
        return str(_item(cell["b64"]))
    if isinstance(cell, list):  # pixels as JSON arrays
        return _pixels(np.asarray(cell))
    if isinstance(cell, np.ndarray) and cell.dtype.kind in "iu":
        return cell if cell.dtype in (np.uint8, np.uint16) else _pixels(cell)
    return cell


def _pixels(array: np.ndarray) -> np.ndarray:
    """Whole-number pixels of another integer type (JSON arrays, int64) as uint8, or uint16
    when they need it; floats stay floats, to be refused by name."""
    if array.dtype.kind not in "iu":
        return array
    low, high = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError(f"pixel values {low}..{high}: send 0..255 (or 0..65535)")
    return array.astype(np.uint8 if high <= 255 else np.uint16)


# MLflow asks for type hints on ``predict``; a type-hinted signature would make its scoring
# server refuse ``dataframe_split`` (see the module docstring), so qi checks its input itself.
# The advice is recorded and dropped: MLflow's own filter ("once") would override ours.
with warnings.catch_warnings(record=True):

    class InspectionModel(mlflow.pyfunc.PythonModel):
        """pyfunc wrapper over :mod:`qi.inference`: validate, preprocess, score, decide."""

        def load_context(self, context) -> None:
            from qi.runtime import keep_freed_memory

            keep_freed_memory()  # a served model owns its process: 2-3x faster CPU inference
            self.spec = ModelSpec.from_json(Path(context.artifacts[SPEC_ARTIFACT]).read_text())
            self.net = load_network(self.spec, Path(context.artifacts[WEIGHTS_ARTIFACT]))

        def predict(
            self, context, model_input, params: dict[str, Any] | None = None
        ) -> pd.DataFrame:
            params = params or {}
            requested = params.get("threshold")
            threshold = self.spec.threshold if requested is None else float(requested)
            try:
                items = images_from_input(model_input)
                if not items:
                    raise ValueError("empty batch: send at least one image")
                batch = prepare_batch(items, self.spec.preprocess)
            except ValueError as exc:
                raise InvalidImageInput(str(exc)) from None
            types = self.spec.defect_types
            if params.get("type_probabilities") and not types:
                raise InvalidImageInput(
                    "type_probabilities: this model learned no defect types (trained with "
                    "--defect-types off, or on data naming fewer than 2 types)"
                )
            probabilities, type_probabilities = probabilities_and_types(self.net, batch)
            decisions = decide(probabilities, threshold)
            frame = pd.DataFrame(
                {
                    "label": label_names(decisions),
                    "defect_probability": probabilities.astype(np.float64),
                    "threshold": threshold,
                }
            )
            if types:
                for column, values in type_columns(decisions, type_probabilities, types).items():
                    # object, not pandas' str dtype: None stays None and REST sends null
                    frame[column] = pd.Series(values, dtype=object, index=frame.index)
            if params.get("type_probabilities"):
                for i, name in enumerate(types):
                    frame[f"type_probability.{name}"] = type_probabilities[:, i].astype(float)
            if params.get("explain"):
                from qi.heatmaps import heatmaps, overlay_png

                maps = heatmaps(self.net, batch)
                frame["heatmap"] = [overlay_png(i, m) for i, m in zip(batch, maps, strict=True)]
            return frame


def encode_png(image: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("could not encode image as PNG")
    return buffer.tobytes()


def _signature(threshold: float) -> mlflow.models.ModelSignature:
    """Outputs and params; no input schema (see the module docstring)."""
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return mlflow.models.ModelSignature(
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("double", "defect_probability"),
                ColSpec("double", "threshold"),
                ColSpec("binary", "heatmap", required=False),  # with params={"explain": true}
                # a model that learned defect types: the type of a defective part
                ColSpec("string", "defect_type", required=False),
                ColSpec("double", "defect_type_probability", required=False),
            ]
        ),
        params=ParamSchema(
            [
                ParamSpec("threshold", "double", threshold),
                ParamSpec("explain", "boolean", False),
                # adds a column type_probability.<type> per learned type
                ParamSpec("type_probabilities", "boolean", False),
            ]
        ),
    )


def pip_requirements() -> list[str]:
    """Pinned versions of what the served model imports (not the training stack)."""
    from importlib.metadata import PackageNotFoundError, version

    names = [
        "torch",
        "torchvision",
        "timm",  # the architectures of the backbones; the weights travel with the model
        "grad-cam",  # params={"explain": true}
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
    net: InspectionNet, spec: ModelSpec, example_image: np.ndarray, name: str = Artifact.MODEL
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
