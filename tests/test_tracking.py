"""The tracking store is checked before any training time is spent."""

import time
from dataclasses import replace

import mlflow
import pytest

from qi.tracking import TrackingError
from qi.train import train


def test_unwritable_artifact_store_fails_before_training(tiny_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("artifacts cannot go below a file")
    mlflow.create_experiment("blocked", artifact_location=str(blocker / "artifacts"))
    config = replace(tiny_config, tracking=replace(tiny_config.tracking, experiment="blocked"))
    started = time.monotonic()
    with pytest.raises(TrackingError, match="cannot write artifacts"):
        train(config, progress=False)
    assert time.monotonic() - started < 60  # no training happened
    (run,) = mlflow.search_runs(experiment_names=["blocked"], output_format="list")
    assert "train/loss" not in run.data.metrics
