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
from qi.inference import LABELS, decide, defect_probabilities

COLUMNS = ["file", "label", "defect_probability", "threshold", "error"]


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
    """One row per file: label, defect probability, threshold, or the error that stopped it."""
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
            if good:
                scores[good] = defect_probabilities(net, np.stack([decoded[i] for i in good]))
            for path, item, score in zip(chunk, decoded, scores, strict=True):
                error = item if isinstance(item, str) else ""
                rows.append(
                    {
                        "file": str(path),
                        "label": "" if error else LABELS[int(decide(score, spec.threshold))],
                        "defect_probability": score,
                        "threshold": spec.threshold,
                        "error": error,
                    }
                )
            bar.update(len(chunk))
    bar.close()
    return PredictionRun(pd.DataFrame(rows, columns=COLUMNS), time.perf_counter() - started)


def _load(path: Path, preprocess) -> np.ndarray | str:
    try:
        return load_and_preprocess(str(path), preprocess)
    except ImageDecodeError as exc:
        return str(exc)
