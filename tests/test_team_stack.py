"""The team stack of docker/compose.tracking.yaml: safe by default, and usable by a worker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qi.services import tracking_server

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_takes_secrets_from_the_environment_and_hides_postgres():
    compose = yaml.safe_load((DOCKER / "compose.tracking.yaml").read_text())
    postgres, server = compose["services"]["postgres"], compose["services"]["mlflow"]
    assert "ports" not in postgres  # only the compose network reaches the database
    text = (DOCKER / "compose.tracking.yaml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD"):
        assert f"${{{secret}:?" in text, secret  # compose refuses to start without it
    assert "qi:qi@" not in text and "POSTGRES_PASSWORD: qi" not in text
    environment = server["environment"]
    assert environment["MLFLOW_APP_NAME"] == "basic-auth"
    assert environment["MLFLOW_ALLOWED_HOSTS"].startswith("${MLFLOW_ALLOWED_HOSTS:?")
    assert server["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:5000:5000"]
    published = yaml.safe_load((DOCKER / "compose.study-db.yaml").read_text())
    assert published["services"]["postgres"]["ports"][0].startswith("${STUDY_DB_BIND:?")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DOCKER / ".env")], cwd=DOCKER.parent)
    assert ignored.returncode == 0  # the secrets file is never committed


@pytest.mark.slow
def test_basic_auth_server_admits_a_worker_with_credentials_only(tiny_casting, database, tmp_path):
    """The tracking image's command with basic auth on PostgreSQL, as compose runs it."""
    auth_ini = tmp_path / "basic_auth.ini"
    auth_ini.write_text(
        (DOCKER / "basic_auth.ini")
        .read_text()
        .replace("sqlite:////mlflow-auth/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}")
    )
    secrets = {
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "a-test-password",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_ALLOWED_HOSTS": "localhost,127.0.0.1,127.0.0.1:*",
    }
    with tracking_server(database, tmp_path / "artifacts", basic_auth=True, **secrets) as url:
        command = [
            sys.executable, "-m", "qi.cli", "tune", "--data-dir", str(tiny_casting),
            "--n-trials", "1", "--epochs", "1", "--image-size", "32", "--batch-size", "16",
            "--models", "cnn", "--storage", str(tmp_path / "s.journal"), "--no-progress",
            "--experiment", "team",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_TRACKING_URI"] = url
        refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1, refused.stderr[-2000:]
        message = refused.stderr.strip().splitlines()[-1]
        assert message.startswith("Error:") and "MLFLOW_TRACKING_USERNAME" in message, message
        assert "Traceback" not in refused.stderr

        env.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD="a-test-password")
        admitted = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert admitted.returncode == 0, admitted.stderr[-3000:]
        assert "registered quality-inspector version 1 as champion" in admitted.stdout
