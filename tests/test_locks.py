"""The registration lock lives where the study lives, and `qi promote` takes the same one."""

import threading

import mlflow
from click.testing import CliRunner

from qi.cli import cli
from qi.locks import registration_lock
from qi.storage import storage_label


def test_promote_by_hand_waits_for_the_lock_of_a_study_on_the_default_storage(tmp_path):
    from qi.registry import promote_by_hand

    # a study without --storage keeps its journal (and so its lock) beside the sqlite store
    study_storage = storage_label(None, mlflow.get_tracking_uri())
    finished, raised = threading.Event(), []

    def promote_a_missing_model():
        try:
            promote_by_hand("locked-model", version="1")
        except Exception as exc:  # noqa: BLE001 (no such model: it got the lock, then failed)
            raised.append(str(exc))
        finished.set()

    with registration_lock("locked-model", study_storage):
        worker = threading.Thread(target=promote_a_missing_model)
        worker.start()
        assert not finished.wait(1.5), "qi promote did not wait for the study's lock"
    assert finished.wait(60)
    worker.join()
    assert raised and "locked-model" in raised[0], raised
    assert study_storage == str(tmp_path / "optuna-studies.journal")
    assert (tmp_path / "optuna-studies.journal.registry-locked-model.lock").exists()


def test_a_storage_qi_cannot_lock_across_machines_is_refused_before_training(tiny_casting):
    result = CliRunner().invoke(
        cli,
        [
            "tune", "--data-dir", str(tiny_casting), "--n-trials", "1", "--epochs", "1",
            "--storage", "oracle://qi:secret@db.internal/optuna", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error:") and "oracle" in message and "--no-register" in message
    assert "secret" not in message and "Traceback" not in result.output
    assert "Trial" not in result.output  # nothing trained
