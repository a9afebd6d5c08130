"""Shared fixtures: isolated MLflow store and qi cache, a tiny casting set made once."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from qi.config import DataConfig, ModelConfig, RunConfig, SynthConfig, TrackingConfig, TrainConfig
from qi.data import synth

TINY_SYNTH = SynthConfig(n_train=60, n_test=24, image_size=48, seed=3)


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qi-cache")


@pytest.fixture(autouse=True)
def isolated_state(tmp_path, monkeypatch, session_cache):
    """Every test gets its own sqlite store and working dir; nothing leaks from `mlflow run`."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("QI_CACHE_DIR", str(session_cache))
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tiny_casting(tmp_path_factory) -> Path:
    """A 84-image casting set in the Kaggle layout (48 px)."""
    return synth.generate(tmp_path_factory.mktemp("casting"), TINY_SYNTH, progress=False)


@pytest.fixture
def tiny_config(tiny_casting, tmp_path) -> RunConfig:
    """A configuration that trains in seconds: tiny images, narrow CNN, one epoch."""
    return RunConfig(
        data=DataConfig(data_dir=tiny_casting, image_size=32, batch_size=16),
        model=ModelConfig(depth=3, width=8),
        train=TrainConfig(epochs=1),
        tracking=TrackingConfig(experiment="qi-test"),
    )


@pytest.fixture
def champion(tiny_config):
    """A trained model registered as quality-inspector@champion in this test's store."""
    from qi.registry import promote, register
    from qi.train import train

    outcome = train(
        replace(tiny_config, train=replace(tiny_config.train, epochs=2)), progress=False
    )
    version = register(outcome.model_uri, "quality-inspector", tags={}, description="test")
    promote("quality-inspector", str(version.version), outcome.data.split_frame("test"))
    return outcome


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server URL without a database: ``QI_TEST_DATABASE_URL`` (a server where
    the tests may create databases, e.g. postgresql+psycopg2://user:pw@host:5432), else a
    throwaway cluster of the installed PostgreSQL."""
    from qi.services import postgres_binaries, postgres_cluster

    given = os.environ.get("QI_TEST_DATABASE_URL")
    if given:
        yield given.rstrip("/")
        return
    if postgres_binaries() is None:
        pytest.skip("no PostgreSQL binaries (install postgresql, or set QI_TEST_DATABASE_URL)")
    with postgres_cluster() as server:
        yield server


@pytest.fixture
def database(postgres_server) -> str:
    """A new, empty database on the test PostgreSQL server; its URL."""
    import uuid

    from qi.services import create_database

    return create_database(postgres_server, f"qi_test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def tracking_server_url(postgres_server, tmp_path_factory):
    """A real `mlflow server` (the tracking image's command) whose backend store is a
    PostgreSQL database and whose artifacts are proxied; shared by the tests that need one,
    which keep apart by experiment and model names."""
    import uuid

    from qi.services import create_database, tracking_server

    store = create_database(postgres_server, f"qi_mlflow_{uuid.uuid4().hex[:12]}")
    with tracking_server(store, tmp_path_factory.mktemp("proxied-artifacts")) as url:
        yield url
