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
