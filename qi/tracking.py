"""Talking to MLflow about stores, runs, params, tags, datasets and artifacts.

Stages call these helpers instead of MLflow's client so that how qi opens, ends and annotates
runs is written once; the names of tags and artifacts live in :mod:`qi.tags`. (The registry,
:mod:`qi.registry`, and the pyfunc logging, :mod:`qi.serving`, use MLflow's model APIs
directly: those are their whole job.)

Default store: ``sqlite:///<working dir>/mlflow.db`` (the registry needs a database), unless
``MLFLOW_TRACKING_URI`` or an explicit URI says otherwise; a remote server works the same.
Under ``mlflow run`` the entry point already runs inside a run (``MLFLOW_RUN_ID``): qi logs
into that run instead of opening another.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException

import qi
from qi.config import TrackingConfig, flatten, to_dict
from qi.interrupts import checkpoint
from qi.tags import Artifact, Tag

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says which and what to do."""


def default_tracking_uri() -> str:
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


# the startup probe's HTTP settings: a server that is down fails in seconds, not after
# minutes of retries; later calls keep MLflow's own retries (a hiccup in hour three of a
# study must not fail a trial or the registration)
FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def fail_fast_http() -> Iterator[None]:
    """:data:`FAIL_FAST_HTTP` inside the block, unless the user set them; as before after."""
    unset = [name for name in FAIL_FAST_HTTP if name not in os.environ]
    os.environ.update({name: FAIL_FAST_HTTP[name] for name in unset})
    try:
        yield
    finally:
        for name in unset:
            os.environ.pop(name, None)


def configure_tracking(config: TrackingConfig) -> str:
    """Set the tracking URI (explicit > MLFLOW_TRACKING_URI > local sqlite) and check it answers.

    The check runs before any training so that a server that is down fails in seconds.
    """
    uri = config.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with fail_fast_http():
            mlflow.search_experiments(max_results=1)
    except Exception as exc:  # any failure here means no training should start
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "error code 401" in first_line or "error code 403" in first_line:
            who = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise TrackingError(
                f"MLflow tracking server {uri} refused "
                + (f"user {who}" if who else "a request without credentials")
                + ": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an account "
                "of that server"
            ) from exc
        raise TrackingError(
            f"MLflow tracking store {uri} is not usable ({first_line[:200]}): start the server "
            "or set MLFLOW_TRACKING_URI to a reachable store"
        ) from exc
    return uri


def experiment_id(name: str) -> str:
    """The experiment to log to: ``mlflow run``'s (MLFLOW_EXPERIMENT_ID), else ``name``."""
    from_env = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if from_env:
        return from_env
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name)
    except MlflowException:  # another worker created it meanwhile
        return mlflow.get_experiment_by_name(name).experiment_id


def mark_model_training(experiment_id: str) -> None:
    """Tag the experiment as model training, so MLflow's UI opens it on its runs rather
    than on the GenAI overview; an experiment kind someone chose is left alone."""
    client = mlflow.MlflowClient()
    if Tag.EXPERIMENT_KIND in client.get_experiment(experiment_id).tags:
        return
    try:
        client.set_experiment_tag(experiment_id, Tag.EXPERIMENT_KIND, Tag.MODEL_TRAINING)
    except MlflowException as exc:  # workers starting together: one insert wins
        if Tag.EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
            log.warning("experiment %s not marked as model training: %s", experiment_id, exc)


def generated_run_name(name: str | None) -> bool:
    """Whether a run name is one MLflow made up (``trusting-fawn-815``), not a user's."""
    return name is None or re.fullmatch(r"[a-z]+-[a-z]+-\d{1,3}", name) is not None


@contextmanager
def training_run(config: TrackingConfig, tags: dict[str, str] | None = None) -> Iterator[str]:
    """An MLflow run for one training; the run ``mlflow run`` opened when there is one."""
    inherited = os.environ.get("MLFLOW_RUN_ID")
    kwargs: dict[str, Any] = {"tags": tags or {}}
    if inherited:
        kwargs["run_id"] = inherited
    else:
        kwargs["experiment_id"] = experiment_id(config.experiment)
        kwargs["run_name"] = config.run_name
    with mlflow.start_run(**kwargs) as run:
        if inherited and config.run_name:
            mlflow.set_tag(Tag.RUN_NAME, config.run_name)
        mark_model_training(run.info.experiment_id)
        try:
            yield run.info.run_id
            checkpoint("run end")  # a stop request swallowed on the way ends the run here
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: stopped on purpose, not broken
            mlflow.set_tag(Tag.INTERRUPTED, "true")
            mlflow.end_run("KILLED")
            raise


def git_commit() -> str | None:
    """The commit of the qi source tree in use, when it is a git checkout."""
    source = Path(qi.__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def standard_tags(data_digest: str | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    tags = {Tag.VERSION: qi.__version__}
    if data_digest:
        tags[Tag.DATA_DIGEST] = data_digest
    commit = git_commit()
    if commit:
        tags[Tag.GIT_COMMIT] = commit
    tags.update(extra or {})
    return tags


def log_config(config: Any, run_id: str, prefix: str = "") -> None:
    """Every setting of a (nested) config dataclass as a run param."""
    params = {k: "" if v is None else v for k, v in flatten(config, prefix).items()}
    client = mlflow.MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_dataset(frame: pd.DataFrame, root: Path, digest: str, name: str, run_id: str) -> None:
    """The file list with labels and split as an MLflow dataset input of the run."""
    table = frame[["image_path", "label", "defect_type", "split"]].copy()
    table["image_path"] = [str(Path(p).relative_to(root)) for p in table["image_path"]]
    with warnings.catch_warnings():
        # MLflow's hints about integer columns and ambiguous local sources do not apply here
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(
            table, source=str(root), targets="label", name=name, digest=digest
        )
        context = [InputTag("mlflow.data.context", "training")]
        entity = DatasetInput(dataset._to_mlflow_entity(), context)
    try:
        mlflow.MlflowClient().log_inputs(run_id, datasets=[entity])
    except MlflowException as exc:
        # workers starting together insert the same dataset: the store's unique key refuses
        # all but one; the dataset then exists, and linking this run to it succeeds
        if "unique" not in str(exc).lower() and "duplicate" not in str(exc).lower():
            raise
        mlflow.MlflowClient().log_inputs(run_id, datasets=[entity])


def log_run_config(config: Any, run_id: str) -> None:
    """The full configuration as ``config.json``, written first: it proves the artifact
    store is writable before any training time is spent."""
    try:
        log_json_artifact(to_dict(config), Artifact.CONFIG, run_id)
    except Exception as exc:
        location = mlflow.MlflowClient().get_run(run_id).info.artifact_uri
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"cannot write artifacts to {location} ({first_line[:200]}): fix its permissions "
            "or set the experiment's artifact location"
        ) from exc


def log_table_artifact(frame: pd.DataFrame, artifact_file: str, run_id: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        folder = str(Path(artifact_file).parent) if Path(artifact_file).parent.name else None
        mlflow.MlflowClient().log_artifact(run_id, str(path), folder)


def log_json_artifact(payload: Any, artifact_file: str, run_id: str) -> None:
    mlflow.MlflowClient().log_text(
        run_id, json.dumps(payload, indent=2, default=str), artifact_file
    )


def log_metrics(metrics: dict[str, float], run_id: str, step: int | None = None) -> None:
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v == v]
    client.log_batch(run_id, metrics=clean)


def read_json_artifact(run_id: str, artifact_file: str) -> Any:
    with tempfile.TemporaryDirectory(prefix="qi-read-") as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_file, dst_path=tmp
        )
        return json.loads(Path(path).read_text())


def read_run_config(run_id: str) -> dict[str, Any]:
    """The ``config.json`` a run logged first (see :func:`log_run_config`)."""
    return read_json_artifact(run_id, Artifact.CONFIG)


def start_child_run(parent_run_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A run nested under ``parent_run_id``, created by id: ``MLFLOW_RUN_ID`` (set under
    ``mlflow run``) can't hijack it, and it exists before anything can fail."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent_run_id).info.experiment_id
    run = client.create_run(
        experiment, run_name=run_name, tags={Tag.PARENT_RUN: parent_run_id, **tags}
    )
    return run.info.run_id


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    client = mlflow.MlflowClient()
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_run(run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Tag and end a run (FINISHED, KILLED or FAILED) that qi created by id."""
    if tags:
        set_tags(run_id, tags)
    mlflow.MlflowClient().set_terminated(run_id, status)


def run_status(run_id: str) -> str:
    return mlflow.MlflowClient().get_run(run_id).info.status


def download_run_artifacts(run_id: str, artifact_path: str, dst_path: str) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=dst_path
        )
    )


def log_artifact_folder(run_id: str, folder: Path, artifact_path: str) -> None:
    mlflow.MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def log_prepared_data(data: Any, run_id: str) -> None:
    """Dataset input, split counts and skipped files of a run's data (a
    :class:`qi.data.datamodule.PreparedData`: ``qi train``'s run and a study's parent run)."""
    log_dataset(data.frame, data.root, data.digest, name=data.root.name, run_id=run_id)
    counts = data.counts().reset_index()
    log_table_artifact(counts, Artifact.SPLIT_COUNTS, run_id)
    log_table_artifact(data.split_table(), Artifact.SPLIT, run_id)
    if data.skipped:
        skipped = [{"path": p, "reason": r} for p, r in data.skipped.items()]
        log_json_artifact(skipped, Artifact.SKIPPED_IMAGES, run_id)
