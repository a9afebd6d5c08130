"""A run records its files and splits; evaluate, promote and export score exactly those."""

import logging
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.config import DataConfig, TrackingConfig
from qi.data.recorded import DataChangedError, recorded_split
from qi.evaluation.run import evaluate_logged_model
from qi.tags import Artifact
from qi.train import train


@pytest.fixture
def trained_with_other_fractions(tiny_casting, tiny_config, tmp_path):
    """A model of a class-folder copy of the castings, with 30% val and 30% test."""
    root = tmp_path / "line"
    for folder in (tiny_casting / "train").iterdir():
        shutil.copytree(folder, root / folder.name)
    data = replace(tiny_config.data, data_dir=root, val_fraction=0.3, test_fraction=0.3)
    return train(replace(tiny_config, data=data), progress=False)


def test_evaluate_scores_exactly_the_recorded_test_split(trained_with_other_fractions, caplog):
    outcome = trained_with_other_fractions
    table = recorded_split(outcome.run_id)
    assert list(table.columns) == ["image_path", "label", "defect_type", "split", "sha256"]
    assert len(table) == len(outcome.data.frame)
    expected = sorted(outcome.data.split_frame("test")["image_path"])
    tracking = TrackingConfig(experiment="qi-test")
    # no folder given, or the run's own: its recorded split, not today's defaults (15%/15%)
    for data_dir in (None, outcome.data.root):
        _, evaluation = evaluate_logged_model(
            outcome.model_uri, DataConfig(data_dir=data_dir), tracking, progress=False
        )
        assert sorted(evaluation.frame["image_path"]) == expected

    # a test image replaced by another one's bytes: left out, said in one line
    changed, donor = expected[0], expected[1]
    shutil.copyfile(donor, changed)
    with caplog.at_level(logging.WARNING):
        _, evaluation = evaluate_logged_model(outcome.model_uri, DataConfig(), tracking, False)
    assert sorted(evaluation.frame["image_path"]) == expected[1:]
    assert f"1 of the {len(table)} files run {outcome.run_id} recorded changed" in caplog.text
    with pytest.raises(DataChangedError, match="--strict-data"):
        evaluate_logged_model(outcome.model_uri, DataConfig(strict_data=True), tracking, False)
    result = CliRunner().invoke(
        cli, ["evaluate", "--model", outcome.model_uri, "--strict-data", "--no-progress"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "changed and 0 are missing" in result.output.splitlines()[-1]


def test_a_run_without_a_recorded_split_still_evaluates(trained_with_other_fractions, caplog):
    """Models logged before qi recorded splits: re-derived from the run's own settings."""
    outcome = trained_with_other_fractions
    client = mlflow.MlflowClient()
    artifacts = client.get_run(outcome.run_id).info.artifact_uri.removeprefix("file://")
    (Path(artifacts) / Artifact.SPLIT).unlink()
    with caplog.at_level(logging.WARNING):
        _, evaluation = evaluate_logged_model(
            outcome.model_uri, DataConfig(), TrackingConfig(experiment="qi-test"), False
        )
    assert "recorded no split" in caplog.text
    expected = sorted(outcome.data.split_frame("test")["image_path"])
    assert sorted(evaluation.frame["image_path"]) == expected  # its fractions, its seed


def test_a_champion_is_judged_only_on_images_it_never_saw(tiny_casting, tiny_config, tmp_path):
    """Champion and candidate split the same folder with other seeds: part of the candidate's
    test split trained the champion, so only the rest is compared (and here that is too
    few to decide anything: the champion stays)."""
    from qi.registry import CHALLENGER, promote, register

    root = tmp_path / "line"
    for folder in (tiny_casting / "train").iterdir():
        shutil.copytree(folder, root / folder.name)
    data = replace(tiny_config.data, data_dir=root, test_fraction=0.4)
    runs = [
        train(replace(tiny_config, data=replace(data, seed=seed)), progress=False)
        for seed in (1, 2)
    ]
    first, second = (register(o.model_uri, "line", {}, "test") for o in runs)
    promote("line", first.version, runs[0].data.split_frame("test"))
    test = runs[1].data.split_frame("test")
    seen = set(runs[0].data.frame.loc[runs[0].data.frame["split"] != "test", "image_path"])
    never_seen = [p for p in test["image_path"] if p not in seen]
    assert 0 < len(never_seen) < len(test)
    decision = promote("line", second.version, test)
    assert decision.alias == CHALLENGER and f"only {len(never_seen)} test images" in decision.reason
    tags = mlflow.MlflowClient().get_model_version("line", second.version).tags
    assert tags["qi.test_images"] == str(len(never_seen))
    assert tags["qi.compared_on"] == "test images neither model trained or validated on"


def test_a_growing_folder_keeps_every_split_and_the_best_trial_is_judged_on_its_own(
    tiny_casting, tiny_config, tmp_path, caplog
):
    """A line's folder grows by 10% between two sessions of one study: every file keeps its
    split, and the second session, which adds no trial, evaluates the best trial on the test
    files its own session recorded, none of which it trained on."""
    from qi.config import TuneConfig
    from qi.study import tune
    from tests.study.test_study import TINY_SPACE

    root, aside = tmp_path / "line", tmp_path / "aside"
    for folder in (tiny_casting / "train").iterdir():
        shutil.copytree(folder, root / folder.name)
    later = sorted(root.rglob("*.png"))[::10]
    for path in later:
        (aside / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(aside / path.parent.name / path.name)
    base = replace(tiny_config, data=replace(tiny_config.data, data_dir=root))
    config = TuneConfig(n_trials=1, epochs=1, timeout=None, space=TINY_SPACE, study_name="line")
    first = tune(base, config, progress=False)
    for path in later:
        (aside / path.parent.name / path.name).rename(path)
    with caplog.at_level(logging.WARNING):
        second = tune(base, config, progress=False)

    assert len(second.study.trials) == 1  # the study had its trial: the session ran none
    before, after = recorded_split(first.parent_run_id), recorded_split(second.parent_run_id)
    assert len(after) == len(before) + len(later)
    kept = before.merge(after, on="image_path", suffixes=("", "_now"))
    assert len(kept) == len(before) and (kept["split"] == kept["split_now"]).all()
    assert set(after["split"]) == {"train", "val", "test"}
    tested = before.loc[before["split"] == "test", "image_path"]
    assert sorted(second.evaluation.frame["image_path"]) == sorted(str(root / p) for p in tested)
    assert f"evaluated on the {len(tested)} test images its worker recorded" in caplog.text
