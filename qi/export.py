"""``qi export``: a logged or registered model as ONNX, published only with proven parity.

The line's inference box often has no PyTorch. The export is one ONNX graph (torch's dynamo
exporter, its current opset) that takes the preprocessed uint8 pixels ``(N, size, size, C)``
with any batch size, normalises them as the network was trained (inside the graph, where it
is exact), runs the network over its test-time views and returns the defect probability (and, for a
model that learned defect types, their probabilities: ``type_probabilities``).
Decoding, channels and resizing stay outside the graph (OpenCV's resampling has no exact ONNX
twin); they are written into the model's metadata and shown in ``score_onnx.py``
(:mod:`qi.onnx_reference`), a qi-free script copied beside the model.

Parity is proven, not assumed: that script preprocesses the model's own test images from
their files, ONNX Runtime scores them, and the scores must match the pyfunc's (which decodes
the same files with qi) to ``tolerance`` with every decision the same. Only then are the
model, the script and the figures logged to the model's run and the version tagged; otherwise
the export is refused and nothing is published.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

import qi
from qi.inference import LABELS, decide
from qi.models import InspectionNet
from qi.tags import Artifact, Tag

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
SCRIPT_FILE = "score_onnx.py"
PARITY_FILE = "parity.json"


class ParityError(RuntimeError):
    """The exported graph does not score as the registered model does: not published."""


@dataclass(frozen=True)
class Parity:
    images: int
    max_abs_difference: float
    decisions_differ: int
    tolerance: float

    @property
    def holds(self) -> bool:
        return self.max_abs_difference <= self.tolerance and self.decisions_differ == 0


@dataclass(frozen=True)
class Export:
    folder: Path
    opset: int
    parity: Parity
    run_id: str
    published: str | None  # the artifact URI, when logged


class _PixelsToProbability(torch.nn.Module):
    """uint8 (N, H, W, C) pixels -> defect probability (N,), and with defect types learned
    their probabilities (N, K): what the graph computes."""

    def __init__(self, net: InspectionNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor):
        images = image.permute(0, 3, 1, 2)
        if self.net.defect_types:
            return self.net.probabilities_and_types(images)
        return self.net.probabilities(images)


def write_onnx(net: InspectionNet, spec, path: Path, model_uri: str) -> int:
    """Export ``net`` to ``path`` with a dynamic batch and the preprocessing in its metadata;
    returns the opset."""
    import onnx

    preprocess = spec.preprocess
    # a detector's fp16 memory bank stays fp16 in the graph (cast per chunk, as in torch)
    detector = net.method == "anomaly"
    scorer = _PixelsToProbability(net.eval() if detector else net.float().eval()).eval()
    shape = (2, preprocess.image_size, preprocess.image_size, preprocess.channels)
    example = torch.zeros(shape, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.onnx.export(
        scorer,
        (example,),
        str(path),
        dynamo=True,
        input_names=["image"],
        output_names=["defect_probability", "type_probabilities"][: 2 if net.defect_types else 1],
        dynamic_shapes={"image": {0: batch}},
        external_data=False,  # one self-contained file (up to ONNX's 2 GB)
        verbose=False,
    )
    model = onnx.load(str(path))
    meta = {
        "qi.image_size": str(preprocess.image_size),
        "qi.color_mode": preprocess.color_mode,
        "qi.channels": str(preprocess.channels),
        "qi.clahe": str(preprocess.clahe).lower(),
        "qi.threshold": repr(float(spec.threshold)),
        "qi.labels": json.dumps(list(LABELS)),
        "qi.input": "image: uint8 (N, size, size, channels), preprocessed as in score_onnx.py; "
        "the graph normalises",
        "qi.output": "defect_probability: float32 (N,); defective when >= qi.threshold",
        "qi.test_time_views": str(net.test_time_views),
        "qi.defect_types": json.dumps(list(net.defect_types)),
        "qi.source_model": model_uri,
        "qi.version": qi.__version__,
    }
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = "qi visual inspection classifier: see the qi.* metadata and score_onnx.py"
    onnx.save(model, str(path))
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def reference_script(folder: Path):
    """``score_onnx.py`` as a module, loaded from the export folder (not from qi)."""
    spec = importlib.util.spec_from_file_location("score_onnx", folder / SCRIPT_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_parity(
    folder: Path, pyfunc, paths: list[str], tolerance: float, batch_size: int = 64
) -> Parity:
    """Reference script + ONNX Runtime vs the pyfunc on the same image files."""
    import onnxruntime

    script = reference_script(folder)
    session = onnxruntime.InferenceSession(
        str(folder / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    config = script.settings(session)
    names = config["defect_types"]
    # with defect types, the type probabilities are compared too: one more column each
    exported, served = [], []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = np.stack([script.load(p, config) for p in chunk])
        if names:
            defect, types = script.score_types(session, batch)
            exported.append(np.column_stack([defect, types]))
        else:
            exported.append(script.score(session, batch)[:, None])
        frame = pd.DataFrame({"image": [Path(p).read_bytes() for p in chunk]})
        answer = pyfunc.predict(frame, params={"type_probabilities": True} if names else None)
        columns = ["defect_probability", *(f"type_probability.{n}" for n in names)]
        served.append(answer[columns].to_numpy())
    onnx_all, pyfunc_all = np.concatenate(exported), np.concatenate(served)
    onnx_scores, pyfunc_scores = onnx_all[:, 0], pyfunc_all[:, 0]
    threshold = config["threshold"]
    differ = int((decide(onnx_scores, threshold) != decide(pyfunc_scores, threshold)).sum())
    return Parity(
        images=len(paths),
        max_abs_difference=float(np.abs(onnx_all - pyfunc_all).max()),
        decisions_differ=differ,
        tolerance=tolerance,
    )


def export_model(
    model_uri: str,
    folder: Path,
    data_dir: Path | None = None,
    tolerance: float = 1e-4,
    publish: bool = True,
    strict_data: bool = False,
) -> Export:
    """Export ``model_uri`` into ``folder``, prove parity on its test images, publish.

    Raises :class:`ParityError` (after writing the files and ``parity.json`` locally, for a
    look) when the scores or decisions differ.
    """
    from qi.data.recorded import run_test_files
    from qi.registry import version_of_uri

    pyfunc = mlflow.pyfunc.load_model(model_uri)
    model = pyfunc.unwrap_python_model()
    run_id = mlflow.models.get_model_info(model_uri).run_id
    folder.mkdir(parents=True, exist_ok=True)
    opset = write_onnx(model.net, model.spec, folder / MODEL_FILE, model_uri)
    shutil.copyfile(Path(__file__).with_name("onnx_reference.py"), folder / SCRIPT_FILE)
    good_only = model.spec.method == "anomaly"
    test = run_test_files(run_id, data_dir, strict_data, good_only=good_only)
    paths = test["image_path"].tolist()
    parity = check_parity(folder, pyfunc, paths, tolerance)
    (folder / PARITY_FILE).write_text(json.dumps({**asdict(parity), "opset": opset}, indent=2))
    if not parity.holds:
        raise ParityError(
            f"ONNX export of {model_uri} does not match the model on {parity.images} test "
            f"images (max |difference| {parity.max_abs_difference:.2e}, tolerance "
            f"{tolerance:.0e}; {parity.decisions_differ} decisions differ): not published; "
            f"files left in {folder}"
        )
    published = None
    if publish:
        client = mlflow.MlflowClient()
        for name in (MODEL_FILE, SCRIPT_FILE, PARITY_FILE):
            client.log_artifact(run_id, str(folder / name), Artifact.ONNX)
        client.log_metric(run_id, "onnx_max_abs_difference", parity.max_abs_difference)
        client.log_metric(run_id, "onnx_decisions_differ", parity.decisions_differ)
        client.log_metric(run_id, "onnx_parity_images", parity.images)
        published = f"runs:/{run_id}/{Artifact.ONNX}/{MODEL_FILE}"
        version = version_of_uri(model_uri)
        if version is not None:
            tags = {
                Tag.ONNX: published,
                Tag.ONNX_PARITY: f"max |diff| {parity.max_abs_difference:.1e} on "
                f"{parity.images} test images, 0 decisions differ, opset {opset}",
            }
            for key, value in tags.items():
                client.set_model_version_tag(version.name, version.version, key, value)
    return Export(folder, opset, parity, run_id, published)
