"""``qi predict``: score folders or files with a logged model, in batches, into a CSV.

It runs the served model's own code (its preprocessing, network and threshold, unwrapped from
the pyfunc) so the figures equal what ``/invocations`` answers, but decodes files in threads
and reports an unreadable file on its own row instead of failing the batch.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from qi.data.discovery import IMAGE_EXTENSIONS
from qi.data.preprocessing import ImageDecodeError, load_and_preprocess
from qi.inference import LABELS, decide, probabilities_and_types, type_columns

COLUMNS = ["file", "label", "defect_probability", "threshold", "error"]
# a model that learned defect types adds these, after defect_probability
TYPE_COLUMNS = ["defect_type", "defect_type_probability"]


@dataclass
class PredictionRun:
    table: pd.DataFrame
    seconds: float

    @property
    def images_per_second(self) -> float:
        scored = int(self.table["error"].eq("").sum())
        return scored / self.seconds if self.seconds > 0 else 0.0


def list_images(inputs: list[Path]) -> list[Path]:
    """Image files named directly or found below the given folders, sorted, no repeats."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist: give image files or folders")
    return sorted(dict.fromkeys(p.resolve() for p in found))


def predict_files(
    model_uri: str, files: list[Path], batch_size: int = 64, progress: bool = True
) -> PredictionRun:
    """One row per file: label, defect probability, threshold (and, for a model that learned
    defect types, the type of a defective part with its probability), or the error that
    stopped it."""
    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    spec, net = model.spec, model.net
    rows: list[dict] = []
    started = time.perf_counter()
    bar = tqdm(total=len(files), desc="scoring", unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            decoded = list(pool.map(lambda p: _load(p, spec.preprocess), chunk))
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            scores = np.full(len(chunk), np.nan)
            kinds = np.zeros((len(chunk), len(spec.defect_types)), np.float32)
            if good:
                scores[good], kinds[good] = probabilities_and_types(
                    net, np.stack([decoded[i] for i in good])
                )
            decisions = decide(np.nan_to_num(scores, nan=0.0), spec.threshold)  # errors: 0
            types = type_columns(decisions, kinds, spec.defect_types) if spec.defect_types else {}
            for i, (path, item) in enumerate(zip(chunk, decoded, strict=True)):
                error = item if isinstance(item, str) else ""
                rows.append(
                    {
                        "file": str(path),
                        "label": "" if error else LABELS[decisions[i]],
                        "defect_probability": scores[i],
                        "threshold": spec.threshold,
                        "error": error,
                        **{column: values[i] for column, values in types.items()},
                    }
                )
            bar.update(len(chunk))
    bar.close()
    columns = COLUMNS[:3] + (TYPE_COLUMNS if spec.defect_types else []) + COLUMNS[3:]
    return PredictionRun(pd.DataFrame(rows, columns=columns), time.perf_counter() - started)


def _load(path: Path, preprocess) -> np.ndarray | str:
    try:
        return load_and_preprocess(str(path), preprocess)
    except ImageDecodeError as exc:
        return str(exc)
