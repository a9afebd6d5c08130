"""``qi explain``: a logged model's heatmap overlays for image files, and a table of them.

The heatmaps themselves are :mod:`qi.heatmaps` (Grad-CAM), which the served model and the
evaluation report use too.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from qi.heatmaps import heatmaps, overlay_png


@dataclass
class Explained:
    file: str
    defect_probability: float
    label: str
    overlay: Path | None
    error: str = ""


def explain_files(model_uri: str, files: list[Path], out_dir: Path) -> list[Explained]:
    """Score each file with the logged model and write its overlay to ``out_dir`` as
    ``<name>.heatmap.png``; an unreadable file is reported, not fatal."""
    import mlflow

    from qi.data.preprocessing import ImageDecodeError, load_and_preprocess
    from qi.inference import LABELS, decide, defect_probabilities

    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    spec, net = model.spec, model.net
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for path in files:
        try:
            image = load_and_preprocess(str(path), spec.preprocess)
        except ImageDecodeError as exc:
            results.append(Explained(str(path), float("nan"), "", None, str(exc)))
            continue
        probability = float(defect_probabilities(net, image[None])[0])
        heatmap = heatmaps(net, image[None])[0]
        target = out_dir / f"{Path(path).stem}.heatmap.png"
        target.write_bytes(overlay_png(image, heatmap))
        label = LABELS[int(decide(probability, spec.threshold))]
        results.append(Explained(str(path), probability, label, target))
    table = pd.DataFrame([asdict(r) for r in results])
    table.to_csv(out_dir / "explained.csv", index=False)
    return results
