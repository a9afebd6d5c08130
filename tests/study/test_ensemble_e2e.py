"""A study that ends in an ensemble: selected on validation, registered as one pyfunc that
answers as its members' weighted average, explained and exported like a single model."""

import json
import re

import mlflow
import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.config import SynthConfig
from qi.data import synth
from qi.data.preprocessing import load_and_preprocess
from qi.inference import defect_probabilities
from qi.storage import open_storage
from qi.study.trials import load_trial_network
from qi.tags import Tag

# heads on the frozen features of the encoder that comes with qi, at 64 px: trials of a
# second or two that disagree enough for an ensemble to pay on this set (seen: trials 1 and 3)
HEADS = {
    "batch_sizes": [16],
    "backbone_image_sizes": [64],
    "models": ["efficientnet_lite0"],
    "finetune": ["head"],
    "head_kinds": ["mlp"],
    "test_time_views": [1, 2],
}
MODEL = "models:/quality-inspector@champion"


@pytest.fixture(scope="module")
def castings(tmp_path_factory):
    """280 castings at 48 px: validation large enough for the selection to see a gain."""
    config = SynthConfig(n_train=200, n_test=80, image_size=48, seed=0)
    return synth.generate(tmp_path_factory.mktemp("castings"), config, progress=False)


@pytest.mark.slow
def test_a_study_registers_an_ensemble_that_serves_explains_and_exports(castings, tmp_path):
    space = tmp_path / "space.json"
    space.write_text(json.dumps(HEADS))
    arguments = ["tune", "--data-dir", str(castings), "--n-trials", "5", "--epochs", "8"]
    result = CliRunner().invoke(
        cli, [*arguments, "--search-space", str(space), "--no-progress", "--timeout", "0"]
    )
    assert result.exit_code == 0, result.output
    assert "model: an ensemble of" in result.output, result.output[-3000:]

    (parent,) = mlflow.search_runs(
        experiment_names=["qi"], filter_string="tags.`qi.kind` = 'tune'", output_format="list"
    )
    told = parent.data.tags[Tag.ENSEMBLE]
    assert told.startswith("an ensemble of")
    assert (
        parent.data.metrics["ensemble_val_log_loss"]
        < parent.data.metrics["best_single_val_log_loss"]
    )
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("quality-inspector", "champion")
    assert version.tags[Tag.ENSEMBLE] == told
    assert version.description.startswith("An ensemble of the study's best trials")

    # the served model answers as the members the selection named, with their weights
    study = optuna.load_study(
        study_name="qi", storage=open_storage(None, mlflow.get_tracking_uri())
    )
    model = mlflow.pyfunc.load_model(MODEL)
    spec = model.unwrap_python_model().spec
    numbers = [int(n) for n, _ in _members(told)]
    assert len(numbers) == len(spec.ensemble) >= 2
    files = sorted(castings.rglob("*.png"))[:6]
    served = model.predict([f.read_bytes() for f in files])
    expected = np.zeros(len(files))
    for number, member in zip(numbers, spec.ensemble, strict=True):
        net, trial_spec = load_trial_network(study.trials[number])
        assert trial_spec.model == member.spec.model
        images = np.stack([load_and_preprocess(str(f), trial_spec.preprocess) for f in files])
        expected += member.weight * defect_probabilities(net, images)
    np.testing.assert_allclose(served["defect_probability"], expected, atol=1e-5)

    # explained and exported as one model
    out = tmp_path / "explained"
    done = CliRunner().invoke(
        cli, ["explain", "--model", MODEL, "-o", str(out), *[str(f) for f in files[:2]]]
    )
    assert done.exit_code == 0, done.output
    assert len(list(out.glob("*.png"))) == 2
    done = CliRunner().invoke(cli, ["export", "--model", MODEL, "-o", str(tmp_path / "onnx")])
    assert done.exit_code == 0, done.output
    assert "0 decisions differ" in done.output


def _members(told: str) -> list[tuple[str, str]]:
    """(trial number, weight) pairs from the tag's 'trial N (w), ...' text."""
    return re.findall(r"trial (\d+) \(([0-9.]+)\)", told)
