"""`mlflow run . -e tune` and parallel `qi tune` workers, as users run them."""

import json
import os
import subprocess
import sys

import mlflow
import optuna
import pytest

from qi.storage import open_storage
from tests.cli.test_mlproject_run import mlflow_run

TINY_SPACE = {
    "batch_sizes": [16],
    "depth": [2, 3],
    "widths": [4, 8],
    "image_sizes": [32],
    "models": ["cnn", "mobilenet_v3_small"],
}


def _children(parent_run_id: str, experiment_id: str):
    return mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )


@pytest.mark.slow
def test_mlflow_run_tune_nests_trials_under_the_project_run(tiny_casting, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("study", artifact_location=str(tmp_path / "artifacts"))
    space = tmp_path / "space.json"
    space.write_text(json.dumps(TINY_SPACE))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))  # no weights: fails
    params = {
        "data_dir": tiny_casting,
        "n_trials": 3,
        "epochs": 2,
        "image_size": 32,
        "batch_size": 16,
        "search_space": space,
        "pretrained": "imagenet",
        # a backbone without weights (fails), then three CNNs: a known mix of outcomes
        "enqueue": json.dumps(
            [{"model.name": m} for m in ("mobilenet_v3_small", "cnn", "cnn", "cnn")]
        ),
        "study_name": "e2e",
    }
    done = mlflow_run("tune", params, uri, "study")
    assert done.returncode == 0, done.stderr[-4000:]

    runs = mlflow.search_runs(experiment_names=["study"], output_format="list")
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["mlflow.project.entryPoint"] == "tune"
    assert parent.info.status == "FINISHED" and parent.data.tags["qi.kind"] == "tune"
    # what the MLflow UI shows: the study's name, the evaluation as the run's description,
    # the experiment opening on its training runs
    assert parent.info.run_name == "e2e-study"
    note = parent.data.tags["mlflow.note.content"]
    assert "Study e2e: best trial" in note and "## Operating points" in note
    experiment = mlflow.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    assert f"{link}?workflowType=machine_learning" in done.stdout  # opens on the runs view
    children = _children(parent.info.run_id, parent.info.experiment_id)
    assert len(children) == len(runs) - 1  # every other run is a child of the project run

    storage = open_storage(None, uri)  # the default journal next to mlflow.db
    study = optuna.load_study(study_name="e2e", storage=storage)
    assert len(study.trials) == len(children)
    states = {t.user_attrs["mlflow_run_id"]: t.state for t in study.trials}
    expected = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
    for child in children:
        assert child.info.status == expected[states[child.info.run_id].name]
        assert child.data.params["train.epochs"] == "2"
    failed = [c for c in children if c.info.status == "FAILED"]
    assert failed and "torch's cache" in failed[0].data.tags["qi.error"]
    complete = [c for c in children if c.info.status == "FINISHED"]
    assert all("objective" in c.data.metrics for c in complete)  # sortable in the runs table
    history = mlflow.MlflowClient().get_metric_history(complete[0].info.run_id, "val/f1")
    assert [m.step for m in history] == [0, 1]
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3, [(t.number, t.state.name) for t in study.trials]
    assert "best_value" in parent.data.metrics and "test/f1" in parent.data.metrics
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id, "study")}
    assert {"study/trials.csv", "study/optimization_history.png"} <= artifacts


@pytest.mark.slow
def test_two_workers_share_one_study(tiny_casting, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    storage = tmp_path / "shared.journal"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env["MLFLOW_TRACKING_URI"] = uri
    space = tmp_path / "space.json"
    space.write_text(json.dumps({**TINY_SPACE, "models": ["cnn"]}))
    command = [
        sys.executable,
        "-m",
        "qi.cli",
        "tune",
        "--data-dir",
        str(tiny_casting),
        "--n-trials",
        "10",
        "--epochs",
        "8",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--search-space",
        str(space),
        "--storage",
        str(storage),
        "--study-name",
        "shared",
        "--experiment",
        "workers",
        "--no-progress",
        "--pruner",
        "none",
    ]
    # create the store once so the two workers do not race on the schema migration
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("workers", artifact_location=str(tmp_path / "artifacts"))
    workers = [
        subprocess.Popen(
            command,
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [w.communicate(timeout=300) for w in workers]
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=open_storage(str(storage), uri))
    trials = study.trials
    # each worker stops once the study has 10 finished trials; one may be mid-trial then.
    # Trials last about a second (8 epochs): with 1-epoch trials of 0.2 s the worker that
    # started first finished the study before the other had imported torch (2026-12-03)
    assert 10 <= len(trials) <= 11
    assert all(t.state.name == "COMPLETE" for t in trials)
    runs = mlflow.search_runs(experiment_names=["workers"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("qi.kind") == "tune"]
    children = [r for r in runs if r.data.tags.get("qi.kind") == "trial"]
    assert len(parents) == 2
    assert sorted(int(c.data.tags["qi.trial_number"]) for c in children) == list(range(len(trials)))
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in trials}
    for child in children:  # under the parent of the worker that ran it
        trial = trials[int(child.data.tags["qi.trial_number"])]
        assert child.data.tags["mlflow.parentRunId"] == trial.user_attrs["mlflow_parent_run_id"]
        assert child.data.tags["qi.worker"] == trial.user_attrs["worker"]
    assert len({c.data.tags["qi.worker"] for c in children}) == 2  # both did work
    # each best trial is registered once, whichever worker finished first
    client = mlflow.MlflowClient()
    versions = client.search_model_versions("name = 'quality-inspector'")
    best_runs = [v.tags["qi.best_run_id"] for v in versions]
    assert len(best_runs) == len(set(best_runs)) >= 1
    assert {p.data.tags["qi.best_run_id"] for p in parents} == set(best_runs)
    assert client.get_model_version_by_alias("quality-inspector", "champion")
