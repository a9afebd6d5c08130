"""What a study leaves on its parent run: the trial table and Optuna's plots as images."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from qi.tags import Artifact  # noqa: E402
from qi.tracking import log_artifact_folder  # noqa: E402

log = logging.getLogger(__name__)

PLOTS = {
    "optimization_history": optuna_plots.plot_optimization_history,
    "param_importances": optuna_plots.plot_param_importances,
    "parallel_coordinate": optuna_plots.plot_parallel_coordinate,
    "slice": optuna_plots.plot_slice,
    "intermediate_values": optuna_plots.plot_intermediate_values,
}


def trial_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, params, duration, MLflow run and worker."""
    table = study.trials_dataframe(
        attrs=("number", "state", "value", "params", "user_attrs", "datetime_start", "duration")
    )
    table.columns = [c.replace("user_attrs_", "").replace("params_", "") for c in table.columns]
    if "duration" in table:
        table["duration_s"] = table["duration"].dt.total_seconds().round(1)
        table = table.drop(columns="duration")
    return table


def _save_plot(name: str, study: optuna.Study, folder: Path) -> Path | None:
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if name == "param_importances" and len(finished) < 2:
        return None
    if not finished:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
        try:
            result = PLOTS[name](study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log.info("no %s plot: %s", name, exc)
            return None
    axes = result.flat[0] if hasattr(result, "flat") else result
    figure = axes.figure
    figure.set_size_inches(max(figure.get_size_inches()[0], 9), max(figure.get_size_inches()[1], 6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some Optuna figures have colour-bar axes
        figure.tight_layout()
    path = folder / f"{name}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def log_study_report(study: optuna.Study, run_id: str) -> list[str]:
    """Trial table (CSV) and plots under ``study/`` of ``run_id``; returns the artifact paths."""
    with tempfile.TemporaryDirectory(prefix="qi-study-") as tmp:
        folder = Path(tmp)
        trial_table(study).to_csv(folder / Path(Artifact.TRIALS_TABLE).name, index=False)
        for name in PLOTS:
            _save_plot(name, study, folder)
        log_artifact_folder(run_id, folder, Artifact.STUDY_DIR)
        return [f"{Artifact.STUDY_DIR}/{p.name}" for p in sorted(folder.iterdir())]
