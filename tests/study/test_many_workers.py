"""Many workers, one study: PostgreSQL storage and a real MLflow tracking server.

Workers are separate `qi tune` processes that play separate machines (``QI_WORKER_HOST``),
so no worker can see another's process: a dead one is found by its missing heartbeats only.
Every wait is on an observable state of the study or the tracking server, not on a sleep.
"""

import json
import os
import subprocess
import sys
import time
import uuid

import mlflow
import optuna
import pytest

from qi.study import best_trial
from qi.study.recovery import WORKER_ATTR

HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "4"]


def _worker(tiny_casting, storage, tracking_url, host, names, tmp_path, n_trials=6, prefix=()):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env.update(MLFLOW_TRACKING_URI=tracking_url, QI_WORKER_HOST=host)
    command = [
        *(prefix or [sys.executable, "-m", "qi.cli"]),
        "tune", "--data-dir", str(tiny_casting), "--n-trials", str(n_trials),
        "--epochs", "3", "--image-size", "32", "--batch-size", "16", "--models", "cnn",
        "--pruner", "none", "--timeout", "0", "--storage", storage,
        "--study-name", names["study"], "--experiment", names["experiment"],
        "--model-name", names["model"], "--no-progress", *HEARTBEAT,
    ]  # fmt: skip
    log = open(tmp_path / f"{host}.log", "w")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log, stderr=log)
    process.log = log
    return process


def _wait_for(condition, what, timeout=240, interval=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def _names():
    tag = uuid.uuid4().hex[:8]
    return {"study": f"many-{tag}", "experiment": f"many-{tag}", "model": f"inspector-{tag}"}


def _study(storage, names):
    return optuna.load_study(study_name=names["study"], storage=storage)


def _trial_of(storage, names, host):
    """A trial of ``host`` that is inside its fit (it reported an epoch)."""
    try:
        trials = _study(storage, names).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    except KeyError:
        return None
    for trial in trials:
        if trial.user_attrs.get("worker", "").startswith(f"{host}:") and trial.intermediate_values:
            return trial
    return None


def _finish(process, timeout=300):
    try:
        process.wait(timeout=timeout)
    finally:
        process.log.close()
    return process.returncode


@pytest.mark.slow
def test_three_workers_one_killed_mid_trial(tiny_casting, database, tracking_server_url, tmp_path):
    names = _names()
    workers = [
        _worker(tiny_casting, database, tracking_server_url, f"machine-{i}", names, tmp_path)
        for i in range(3)
    ]
    victim = _wait_for(lambda: _trial_of(database, names, "machine-0"), "machine-0's trial")
    workers[0].kill()  # SIGKILL: nothing of it runs again
    _finish(workers[0])
    for i, worker in enumerate(workers[1:], start=1):
        code = _finish(worker)
        assert code == 0, (tmp_path / f"machine-{i}.log").read_text()[-3000:]

    study = _study(database, names)
    states = [t.state for t in study.trials]
    finished = [t for t in study.trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) >= 6, [(t.number, t.state.name) for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert study.trials[victim.number].state == optuna.trial.TrialState.FAIL

    mlflow.set_tracking_uri(tracking_server_url)
    runs = mlflow.search_runs(experiment_names=[names["experiment"]], output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    children = [r for r in runs if r.data.tags.get("qi.kind") == "trial"]
    for trial in finished:  # exactly one child run per finished trial
        own = [r for r in children if r.data.tags["qi.trial_number"] == str(trial.number)]
        assert len(own) == 1 and own[0].info.status in ("FINISHED", "KILLED"), trial.number
    dead_child = mlflow.get_run(victim.user_attrs["mlflow_run_id"])
    assert dead_child.info.status == "FAILED"
    assert "stopped sending heartbeats" in dead_child.data.tags["qi.error"]
    dead_parent = mlflow.get_run(victim.user_attrs["mlflow_parent_run_id"])
    assert dead_parent.info.status == "KILLED" and "machine-0" in dead_parent.data.tags["qi.error"]

    client = mlflow.MlflowClient()
    versions = client.search_model_versions(f"name = '{names['model']}'")
    assert len(versions) == 1, [v.version for v in versions]  # registered once
    champion = client.get_model_version_by_alias(names["model"], "champion")
    best_run = best_trial(study).user_attrs["mlflow_run_id"]  # qi's rule: ties by val/loss
    assert champion.version == versions[0].version
    assert champion.tags["qi.best_run_id"] == best_run


KILL_AT_EVALUATION = r"""
import os, signal, sys
from qi import interrupts
from qi.cli import main

def die(phase):
    if phase == "evaluation":
        os.kill(os.getpid(), signal.SIGKILL)

with interrupts.listen(die):
    sys.argv = ["qi", *sys.argv[1:]]
    main()
"""


@pytest.mark.slow
def test_a_worker_killed_after_its_last_trial_is_cleaned_up(
    tiny_casting, database, tracking_server_url, tmp_path
):
    """Killed during evaluation: no trial is left to go stale, yet its parent run must not
    stay RUNNING for ever. `qi study status` reports it dead; the next worker closes its run
    and registers the best model, once."""
    names = _names()
    dying = _worker(
        tiny_casting, database, tracking_server_url, "machine-a", names, tmp_path, n_trials=2,
        prefix=[sys.executable, "-c", KILL_AT_EVALUATION],
    )  # fmt: skip
    _finish(dying)
    assert dying.returncode == -9, (tmp_path / "machine-a.log").read_text()[-3000:]
    study = _study(database, names)
    (record,) = [v for k, v in study.user_attrs.items() if k.startswith(WORKER_ATTR)]
    mlflow.set_tracking_uri(tracking_server_url)
    assert mlflow.get_run(record["parent_run_id"]).info.status == "RUNNING"

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_server_url}
    status_command = [
        sys.executable, "-m", "qi.cli", "study", "status", "--storage", database,
        "--study-name", names["study"], "--grace-period", "4", "--json",
    ]  # fmt: skip

    def reported_dead():
        done = subprocess.run(status_command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        status = json.loads(done.stdout)
        return status if any(w["state"] == "dead" for w in status["workers"].values()) else None

    status = _wait_for(reported_dead, "the status to call machine-a dead", interval=1.0)
    assert status["trials"] == {"complete": 2} and status["best"]["run_id"]
    assert status["workers"][next(iter(status["workers"]))]["parent_run_status"] == "RUNNING"

    again = _worker(tiny_casting, database, tracking_server_url, "machine-b", names, tmp_path, 2)
    assert _finish(again) == 0, (tmp_path / "machine-b.log").read_text()[-3000:]
    parent = mlflow.get_run(record["parent_run_id"])
    assert parent.info.status == "KILLED" and "machine-a" in parent.data.tags["qi.error"]
    runs = mlflow.search_runs(experiment_names=[names["experiment"]], output_format="list")
    assert all(r.info.status != "RUNNING" for r in runs)
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{names['model']}'")
    assert len(versions) == 1
