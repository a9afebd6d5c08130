"""Killed workers: a study stopped by Ctrl-C or SIGKILL resumes and finishes, nothing twice."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest

from qi.storage import open_storage


def _tune_command(data_dir, storage, n_trials, epochs=40):
    return [
        sys.executable,
        "-m",
        "qi.cli",
        "tune",
        "--data-dir",
        str(data_dir),
        "--n-trials",
        str(n_trials),
        "--epochs",
        str(epochs),
        "--image-size",
        "48",
        "--batch-size",
        "16",
        "--pruner",
        "none",
        "--models",
        "cnn",
        "--timeout",
        "0",
        "--study-name",
        "killed",
        "--storage",
        str(storage),
        "--experiment",
        "killed",
        "--no-progress",
        "--no-register",
    ]


def _wait_for_running_trial(storage, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name="killed", storage=storage)
            running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
            # inside fit for sure: it reported an epoch and has 39 to go
            if running and running[0].intermediate_values:
                return running[0]
        except KeyError:
            pass
        time.sleep(0.2)
    raise AssertionError("no trial started")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_killed_study_resumes_and_finishes(how, tiny_casting, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("killed", artifact_location=str(tmp_path / "artifacts"))
    journal = tmp_path / "studies.journal"
    storage = open_storage(str(journal), uri)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env["MLFLOW_TRACKING_URI"] = uri
    worker = subprocess.Popen(
        _tune_command(tiny_casting, journal, 2),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = _wait_for_running_trial(storage)
    worker.send_signal(how)
    _, err = worker.communicate(timeout=120)
    client = mlflow.MlflowClient()
    child = client.get_run(victim.user_attrs["mlflow_run_id"])
    if how == signal.SIGINT:
        assert worker.returncode == 130 and "interrupted" in err, err[-3000:]
        study = optuna.load_study(study_name="killed", storage=storage)
        assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
        assert child.info.status == "KILLED"
        assert child.data.tags["qi.trial_state"] == "interrupted"
        parent = client.get_run(victim.user_attrs["mlflow_parent_run_id"])
        assert parent.info.status == "KILLED" and parent.data.tags["qi.interrupted"] == "true"
    else:
        assert worker.returncode == -signal.SIGKILL
        assert child.info.status == "RUNNING"  # nobody could mark it

    again = subprocess.run(  # the rest of the study: shorter trials, the same study
        _tune_command(tiny_casting, journal, 2, epochs=3),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    study = optuna.load_study(study_name="killed", storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 2
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL
    assert optuna.trial.TrialState.RUNNING not in states
    runs = mlflow.search_runs(experiment_names=["killed"], output_format="list")
    children = [r for r in runs if r.data.tags.get("qi.kind") == "trial"]
    assert sorted(int(r.data.tags["qi.trial_number"]) for r in children) == list(
        range(len(study.trials))
    )  # every trial logged exactly once
    assert all(r.info.status != "RUNNING" for r in runs)
    victim_run = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert victim_run.info.status in ("KILLED", "FAILED")
