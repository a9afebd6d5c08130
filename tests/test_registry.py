"""Guarded promotion against a real sqlite model registry."""

from dataclasses import replace

import mlflow
import pytest
import torch

from qi.inference import ModelSpec
from qi.registry import CHALLENGER, CHAMPION, champion, decide, promote, promote_by_hand, register
from qi.serving import log_inspection_model
from qi.train import train


def test_decision_rule():
    assert decide(0.9, None, False)[0] == CHAMPION
    assert decide(0.9, 0.8, False)[0] == CHAMPION
    assert decide(0.8, 0.8, False)[0] == CHALLENGER  # a tie keeps the champion
    assert decide(0.1, 0.9, True) == (CHAMPION, "promotion forced by the user")


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
