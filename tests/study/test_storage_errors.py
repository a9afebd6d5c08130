"""A storage that cannot hold the study is a one-line error before any training."""

import optuna
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.services import free_port


def _tune(tiny_casting, storage, *extra):
    return CliRunner().invoke(
        cli,
        [
            "tune", "--data-dir", str(tiny_casting), "--n-trials", "1", "--epochs", "1",
            "--storage", storage, "--study-name", "checked", "--no-progress", *extra,
        ],
    )  # fmt: skip


def _one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    message = result.output.strip().splitlines()[-1]  # MLflow may log above it
    assert message.startswith("Error:"), result.output
    assert "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


def test_unreachable_database_and_missing_driver(tiny_casting):
    port = free_port()  # nothing listens there
    refused = _tune(tiny_casting, f"postgresql+psycopg2://qi:secret@127.0.0.1:{port}/optuna")
    message = _one_line_error(refused, f"127.0.0.1:{port}", "check the host, port")
    assert "secret" not in message  # the password is not echoed
    driver = _tune(tiny_casting, "mysql+mysqldb://qi@127.0.0.1/optuna")
    _one_line_error(driver, "driver is missing", "pip install")


def test_wrong_user_and_missing_database(tiny_casting, postgres_server, database):
    wrong_user = database.replace("postgres@", "nobody@")
    _one_line_error(_tune(tiny_casting, wrong_user), "nobody", "check the host, port, user")
    missing = postgres_server + "/no_such_database"
    _one_line_error(_tune(tiny_casting, missing), "no_such_database")


def test_a_study_of_another_metric_or_direction(tiny_casting, tmp_path):
    from qi.config import TuneConfig
    from qi.storage import open_storage
    from qi.study.worker import load_or_create_study

    journal = str(tmp_path / "studies.journal")
    storage = open_storage(journal, "sqlite:///unused.db")
    load_or_create_study(storage, TuneConfig(study_name="checked", metric="val/f1"))
    other = _tune(tiny_casting, journal, "--metric", "val/loss")
    _one_line_error(other, "optimises val/f1, not val/loss", "--study-name")
    optuna.create_study(study_name="made-elsewhere", storage=storage, direction="minimize")
    flipped = _tune(tiny_casting, journal, "--study-name", "made-elsewhere")
    _one_line_error(flipped, "made-elsewhere", "minimize")


@pytest.mark.parametrize("interval,grace", [(20, 20), (30, 10)])
def test_grace_period_must_exceed_the_heartbeat(tiny_casting, tmp_path, interval, grace):
    result = _tune(
        tiny_casting,
        str(tmp_path / "s.journal"),
        "--heartbeat-interval",
        str(interval),
        "--grace-period",
        str(grace),
    )
    _one_line_error(result, "--grace-period", "--heartbeat-interval")


def test_the_database_password_stays_out_of_what_others_read():
    from qi.config import TuneConfig
    from qi.storage import public_label, redacted
    from qi.study.space import describe

    url = "postgresql+psycopg2://qi:s3cret@db.internal:5432/optuna"
    assert redacted(url) == "postgresql+psycopg2://qi:***@db.internal:5432/optuna"
    assert public_label(url, "sqlite:///unused.db") == redacted(url)
    assert "s3cret" not in str(describe(TuneConfig(storage=url)))  # the parent run's params
    assert redacted("/tmp/studies.journal") == "/tmp/studies.journal"


OPEN_ON_SIGNAL = """
import pathlib, sys, time
from qi.storage import open_storage
import optuna, sqlalchemy  # imported before the start, so that all open at once
folder = pathlib.Path(sys.argv[2])
(folder / f"ready-{sys.argv[3]}").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
time.sleep(max(0.0, float((folder / "go").read_text()) - time.time()))  # one start for all
open_storage(sys.argv[1], "sqlite:///unused.db")
"""


def test_workers_starting_together_on_a_new_database(postgres_server, tmp_path):
    """Every worker of a fresh study creates Optuna's schema at once (CI, 2026-12-03:
    "relation alembic_version already exists" killed one of two workers; measured here, one
    round in five of four processes lost the race): all must open it."""
    import subprocess
    import sys
    import time
    import uuid

    from qi.services import create_database
    from qi.storage import open_storage

    for round_ in range(5):  # the race is narrow: five fresh databases, four openers each
        url = create_database(postgres_server, f"qi_race_{uuid.uuid4().hex[:12]}")
        folder = tmp_path / str(round_)
        folder.mkdir()
        openers = [
            subprocess.Popen(
                [sys.executable, "-c", OPEN_ON_SIGNAL, url, str(folder), str(i)],
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(4)
        ]
        while len(list(folder.glob("ready-*"))) < len(openers):
            assert all(p.poll() is None for p in openers), [p.stderr.read() for p in openers]
            time.sleep(0.05)
        (folder / "go.tmp").write_text(str(time.time() + 0.2))
        (folder / "go.tmp").rename(folder / "go")
        errors = [p.communicate(timeout=120)[1] for p in openers]
        assert all(p.returncode == 0 for p in openers), [e[-600:] for e in errors if e]
        study = optuna.create_study(study_name="after", storage=open_storage(url, "sqlite:///x"))
        assert study.study_name == "after"


def test_a_study_file_reused_with_another_tracking_store_is_one_line(tiny_casting, tmp_path):
    """The study remembers trials whose runs another store holds: refused before training,
    not after the new trials, when the best model could not be read back."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = tmp_path / "study.journal"
    study = optuna.create_study(
        storage=JournalStorage(JournalFileBackend(str(journal))),
        study_name="checked",
        direction="maximize",
    )
    elsewhere = "0123456789abcdef0123456789abcdef"  # a run of a store not given here
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"mlflow_run_id": elsewhere}))
    result = _tune(tiny_casting, str(journal), "--tracking-uri", f"sqlite:///{tmp_path}/new.db")
    _one_line_error(result, "study 'checked'", elsewhere, "use the tracking store")
