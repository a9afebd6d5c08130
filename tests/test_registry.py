"""Guarded promotion against a real sqlite model registry."""

import json
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from qi.cli import cli
from qi.evaluation.comparison import Comparison, paired_bootstrap
from qi.inference import ModelSpec
from qi.registry import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    champion,
    decide,
    promote,
    promote_by_hand,
    register,
    version_of_trial_run,
)
from qi.serving import log_inspection_model
from qi.train import train


def _comparison(difference: tuple[float, float]) -> Comparison:
    return Comparison("f1", 300, 0.9, 0.85, (0.87, 0.93), (0.82, 0.88), difference)


def test_decision_rule():
    assert decide(None, 0.0, False) == (CHAMPION, "no champion yet")
    assert decide(_comparison((0.01, 0.09)), 0.0, False)[0] == CHAMPION
    # ahead on these images, but not by more than they can be wrong about
    alias, reason = decide(_comparison((-0.01, 0.11)), 0.0, False)
    assert alias == CHALLENGER and "difference [-0.0100, 0.1100]" in reason
    assert decide(_comparison((0.01, 0.09)), 0.02, False)[0] == CHALLENGER  # the margin
    assert decide(_comparison((-0.5, -0.1)), 0.0, True) == (
        CHAMPION,
        "promotion forced by the user",
    )


def test_paired_bootstrap_sees_a_real_lead_and_not_a_coin_flip():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    truthful = np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.25, 300)
    weaker = np.where(labels == 1, 0.6, 0.4) + rng.normal(0, 0.25, 300)
    lead = paired_bootstrap(labels, (truthful, 0.5), (weaker, 0.5), "acc")
    assert lead.difference_interval[0] > 0 and lead.candidate > lead.champion
    # the same model with a little noise on its scores: no lead the images support
    noise = truthful + rng.normal(0, 0.1, 300)
    tie = paired_bootstrap(labels, (noise, 0.5), (truthful, 0.5), "acc")
    assert tie.difference_interval[0] < 0 < tie.difference_interval[1]
    assert decide(tie, 0.0, False)[0] == CHALLENGER


@pytest.fixture
def good_and_bad_models(tiny_config):
    """A trained model, and a broken copy that calls every part ok (F1 = 0). The 3-epoch
    model's scores sit near 0.5; a recall target puts its threshold where it flags defects."""
    config = replace(
        tiny_config,
        train=replace(tiny_config.train, epochs=3),
        evaluation=replace(tiny_config.evaluation, target_recall=0.99),
    )
    outcome = train(config, progress=False)
    broken = outcome.result.net
    with torch.no_grad():
        last = [m for m in broken.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.fill_(-20.0)
    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("qi-test").experiment_id):
        mlflow.set_tags({"qi.data_root": str(outcome.data.root)})
        spec = ModelSpec(model=config.model, preprocess=outcome.data.preprocess)
        bad_uri = log_inspection_model(broken, spec, outcome.data.images[0]).model_uri
    return outcome.model_uri, bad_uri, outcome.data.split_frame("test"), outcome


def test_guarded_promotion(good_and_bad_models):
    good_uri, bad_uri, test_frame, _ = good_and_bad_models
    name = "inspector"
    v1 = register(bad_uri, name, tags={"qi.study_name": "s"}, description="bad")
    first = promote(name, v1.version, test_frame)
    assert first.alias == CHAMPION and first.reason == "no champion yet"

    v2 = register(good_uri, name, tags={}, description="good")
    better = promote(name, v2.version, test_frame)
    assert better.alias == CHAMPION and better.candidate_score > better.champion_score == 0.0
    assert str(champion(name).version) == str(v2.version)

    v3 = register(bad_uri, name, tags={}, description="bad again")
    worse = promote(name, v3.version, test_frame)
    assert worse.alias == CHALLENGER and str(champion(name).version) == str(v2.version)
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias(name, CHALLENGER).version) == str(v3.version)
    tags = client.get_model_version(name, v3.version).tags
    assert tags["qi.promotion"] == CHALLENGER and "does not beat" in tags["qi.promotion_reason"]
    assert float(tags["qi.champion_score"]) > float(tags["qi.candidate_score"])
    assert tags["qi.previous_champion_version"] == str(v2.version)

    forced = promote(name, v3.version, test_frame, force=True)
    assert forced.alias == CHAMPION and str(champion(name).version) == str(v3.version)
    assert client.get_model_version(name, v1.version).description == "bad"


def test_promote_by_hand_from_a_run(good_and_bad_models):
    _, _, _, outcome = good_and_bad_models
    decision = promote_by_hand("by-hand", run_id=outcome.run_id)
    assert decision.alias == CHAMPION and decision.version == "1"
    again = promote_by_hand("by-hand", version="1")
    assert again.reason == "already the champion"
    with pytest.raises(ValueError, match="exactly one"):
        promote_by_hand("by-hand")


class FailingRegistry(BaseHTTPRequestHandler):
    """An MLflow REST endpoint that answers every request with the server's status."""

    def _answer(self) -> None:
        self.server.requests.append((self.command, self.path))
        status, code = self.server.answer
        body = json.dumps({"error_code": code, "message": f"refused with {status}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=[(500, "INTERNAL_ERROR"), (403, "PERMISSION_DENIED")], ids=str)
def failing_registry(request, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingRegistry)
    server.answer, server.requests = request.param, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a 500 is retried otherwise
    yield server, url
    server.shutdown()


def test_a_failing_registry_stops_with_one_line_and_promotes_nothing(failing_registry, tmp_path):
    """A 500 or a 403 is not "no champion yet": the promotion stops, naming the operation
    and the registry, and no alias is set."""
    server, url = failing_registry
    frame = pd.DataFrame({"image_path": [], "label": []})
    with pytest.raises(RegistryError) as raised:
        promote("line-a", "3", frame, candidate_score=0.9)
    message = str(raised.value)
    assert "reading the champion of line-a" in message and url in message
    assert len(message.splitlines()) == 1
    assert {command for command, _ in server.requests} == {"GET"}  # nothing was written
    with pytest.raises(RegistryError, match="listing the versions"):
        version_of_trial_run("line-a", "some-run")
    # the command says the same in one line, with no traceback
    result = CliRunner().invoke(
        cli,
        ["promote", "--version", "3", "--model-name", "line-a",
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
    )  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"model registry {url}: reading line-a version 3 failed" in result.output
