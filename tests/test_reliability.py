"""What happens in practice: bad files, killed studies, broken stores, repeated runs."""

import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest

from qi.config import DataConfig, TuneConfig
from qi.data.datamodule import prepare_data
from qi.data.discovery import DataLayoutError
from qi.data.preprocessing import ImageDecodeError, decode_image
from qi.study_setup import open_storage
from qi.tracking import TrackingError
from qi.train import train
from qi.tuning import tune
from tests.helpers import make_class_folders, write_image


def png_bomb(width=40_000, height=40_000) -> bytes:
    """A valid PNG header declaring a huge image; decoding it would take gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_from_its_header():
    with pytest.raises(ImageDecodeError, match="decompression bomb|pixel limit"):
        decode_image(png_bomb())


@pytest.fixture
def messy_folder(tmp_path):
    root = make_class_folders(tmp_path / "data", {"ok": 8, "defective": 8})
    (root / "ok" / "zero.png").write_bytes(b"")
    (root / "ok" / "notes.jpg").write_text("a text file with an image extension")
    whole = (root / "ok" / "ok_0.png").read_bytes()
    (root / "defective" / "cut.png").write_bytes(whole[: len(whole) // 3])
    (root / "defective" / "bomb.png").write_bytes(png_bomb())
    write_image(root / "ok" / "deep.png", 99, dtype=np.uint16)  # 16-bit: kept
    write_image(root / "defective" / "alpha.png", 98, channels=4)  # RGBA: kept
    (root / "scratch").mkdir()  # an empty defect-type folder is just empty
    return root


def test_bad_images_are_skipped_and_listed(messy_folder):
    data = prepare_data(DataConfig(data_dir=messy_folder, image_size=16), progress=False)
    skipped = {Path(p).name for p in data.skipped}
    assert skipped == {"zero.png", "notes.jpg", "cut.png", "bomb.png"}
    assert len(data.frame) == 18  # 16 + the 16-bit and the RGBA image
    assert {"deep.png", "alpha.png"} <= {Path(p).name for p in data.frame["image_path"]}


def test_strict_policy_stops_at_the_first_bad_file(messy_folder):
    with pytest.raises(ImageDecodeError, match=r"(zero|notes|cut|bomb)\.(png|jpg)"):
        prepare_data(
            DataConfig(data_dir=messy_folder, image_size=16, bad_images="strict"), progress=False
        )


def test_skipped_files_are_an_artifact_of_the_run(messy_folder, tiny_config, caplog):
    config = replace(tiny_config, data=replace(tiny_config.data, data_dir=messy_folder))
    with caplog.at_level("WARNING"):
        outcome = train(config, progress=False)
    assert "skipped 4 unreadable image(s)" in caplog.text
    path = mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="data/skipped_images.json"
    )
    listed = {Path(row["path"]).name for row in json.loads(Path(path).read_text())}
    assert listed == {"zero.png", "notes.jpg", "cut.png", "bomb.png"}


def test_one_class_or_empty_class_fails_fast(tmp_path):
    make_class_folders(tmp_path / "a", {"ok": 10})
    (tmp_path / "a" / "defective").mkdir()
    with pytest.raises(DataLayoutError, match="0 defective image"):
        prepare_data(DataConfig(data_dir=tmp_path / "a"), progress=False)
    make_class_folders(tmp_path / "b", {"good": 6})
    with pytest.raises(DataLayoutError, match="0 defective image"):
        prepare_data(DataConfig(data_dir=tmp_path / "b"), progress=False)


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


def test_same_seed_same_trial_params(tiny_config):
    space = replace(
        TuneConfig().space, image_sizes=(32,), batch_sizes=(16,), widths=(4,), depth=(2, 2)
    )
    studies = []
    for name in ("first", "second"):
        config = TuneConfig(
            study_name=name, n_trials=3, epochs=1, timeout=None, space=space, seed=7, pruner="none"
        )
        studies.append(
            tune(tiny_config, replace(config, start_with_defaults=False), progress=False).study
        )
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]


def _tune_command(data_dir, storage, n_trials):
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
        "40",
        "--image-size",
        "48",
        "--batch-size",
        "16",
        "--pruner",
        "none",
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
            if running and running[0].user_attrs.get("mlflow_run_id"):
                time.sleep(1.0)  # let it train an epoch or so
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

    again = subprocess.run(
        _tune_command(tiny_casting, journal, 2),
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
