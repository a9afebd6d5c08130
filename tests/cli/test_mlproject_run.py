"""The real `mlflow run` path: MLFLOW_RUN_ID is set and qi must log into that run."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

PROJECT = Path(__file__).resolve().parents[2]


def mlflow_run(entry_point: str, params: dict, tracking_uri: str, experiment: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    # `qi` must be on PATH as in an activated environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(PROJECT),
        "-e",
        entry_point,
        "--env-manager",
        "local",
        "--experiment-name",
        experiment,
    ]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_mlflow_run_train_entry_point(tiny_casting, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("project", artifact_location=str(tmp_path / "artifacts"))
    done = mlflow_run(
        "train",
        {"data_dir": tiny_casting, "epochs": 1, "image_size": 32, "batch_size": 16},
        uri,
        "project",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = mlflow.search_runs(experiment_names=["project"], output_format="list")
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "train"
    assert run.data.params["epochs"] == "1"  # MLproject parameter
    assert run.data.params["train.epochs"] == "1"  # qi's own config, same run
    assert "test/acc" in run.data.metrics
    assert run.data.tags["qi.data_digest"]
    models = mlflow.search_logged_models(
        experiment_ids=[run.info.experiment_id], output_format="list"
    )
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id
