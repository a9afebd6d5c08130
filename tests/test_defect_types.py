"""Which defect, not only whether: types learned, served, exported and reported."""

import io
import json
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.config import ModelConfig, SynthConfig
from qi.data import synth
from qi.data.types import MIN_TYPE_IMAGES, NO_TYPE, learnable_types, type_targets
from qi.evaluation.types import NOT_LEARNED, evaluate_types
from qi.inference import ModelSpec
from qi.train import train

# five types, about 16 training images each after the split: enough to learn them
TYPED_SYNTH = SynthConfig(n_train=200, n_test=60, image_size=48, seed=5)
CASTING_TYPES = ("blow_hole", "chipped_edge", "crack", "pin_holes", "scratch_burr")


@pytest.fixture(scope="module")
def typed_casting(tmp_path_factory):
    return synth.generate(tmp_path_factory.mktemp("typed"), TYPED_SYNTH, progress=False)


def _frame(counts: dict[str, int], split: str = "train") -> pd.DataFrame:
    rows = [("ok.png", 0, "none", split)] * 5
    for kind, n in counts.items():
        rows += [(f"{kind}{i}.png", 1, kind, split) for i in range(n)]
    return pd.DataFrame(rows, columns=["image_path", "label", "defect_type", "split"])


def test_the_rule_two_types_with_enough_training_images():
    enough, short = MIN_TYPE_IMAGES, MIN_TYPE_IMAGES - 1
    assert learnable_types(_frame({"crack": enough, "burr": enough, "hole": short})) == (
        "burr",
        "crack",
    )
    assert learnable_types(_frame({"crack": enough, "hole": short})) == ()  # one type: no choice
    assert learnable_types(_frame({"crack": 50, "burr": 50}, split="test")) == ()  # train only
    frame = _frame({"crack": enough, "burr": enough, "hole": short})
    targets = type_targets(frame, ("burr", "crack"))
    assert set(targets[frame["defect_type"] == "hole"]) == {NO_TYPE}  # not learned
    assert set(targets[frame["label"] == 0]) == {NO_TYPE}
    assert set(targets[frame["defect_type"] == "crack"]) == {1}


def test_type_figures_count_only_caught_defects():
    frame = pd.DataFrame(
        {
            "image_path": [f"{i}.png" for i in range(6)],
            "label": [0, 1, 1, 1, 1, 1],
            "defect_type": ["none", "crack", "crack", "burr", "burr", "hole"],
        }
    )
    decisions = np.array([0, 1, 0, 1, 1, 1])  # the second crack is missed
    # columns (burr, crack): crack named crack, -, burr named crack, burr named burr, and
    # the unlearned hole named burr
    probabilities = np.array(
        [[0.5, 0.5], [0.1, 0.9], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.6, 0.4]]
    )
    types = evaluate_types(frame, decisions, probabilities, ("burr", "crack"))
    assert types.caught == 3 and types.caught_accuracy == pytest.approx(2 / 3)
    assert list(types.truth) == ["ok", "crack", "crack", "burr", "burr", NOT_LEARNED]
    assert list(types.predicted) == ["ok", "crack", "ok", "crack", "burr", "burr"]
    confusion = types.confusion()
    assert confusion.loc["crack", "ok"] == 1 and confusion.loc["burr", "crack"] == 1
    assert confusion.loc[NOT_LEARNED, "burr"] == 1  # shown, never scored
    mistakes = types.frequent_confusions()
    assert mistakes.iloc[0][["true", "named", "images"]].tolist() == ["burr", "crack", 1]
    assert mistakes.iloc[0]["example"] == "3.png" and mistakes.iloc[0]["named_example"] == "1.png"


def test_a_model_before_types_loads_without_them():
    spec = json.loads(ModelSpec(ModelConfig(), preprocess=_preprocess()).to_json())
    del spec["defect_types"]
    assert ModelSpec.from_json(json.dumps(spec)).defect_types == ()


def _preprocess():
    from qi.data.preprocessing import PreprocessConfig

    return PreprocessConfig(image_size=32)


def test_types_are_learned_served_predicted_exported_and_reported(
    typed_casting, tiny_config, tmp_path
):
    config = replace(
        tiny_config,
        data=replace(tiny_config.data, data_dir=typed_casting),
        train=replace(tiny_config.train, epochs=3),
    )
    outcome = train(config, progress=False)
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    assert model.unwrap_python_model().spec.defect_types == CASTING_TYPES

    run = mlflow.get_run(outcome.run_id)
    for name in ("test/type_macro_f1", "test/type_accuracy_caught", "val/type_macro_f1"):
        assert 0.0 <= run.data.metrics[name] <= 1.0, name
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(outcome.run_id, "evaluation")}
    for name in ("type_report.json", "type_confusion_counts.csv", "type_confusion_matrix.png"):
        assert f"evaluation/{name}" in logged
    summary = mlflow.artifacts.load_text(f"runs:/{outcome.run_id}/evaluation/summary.md")
    assert "## Defect types" in summary and "macro avg" in summary

    test = outcome.data.split_frame("test")
    images = pd.DataFrame({"image": [Path(p).read_bytes() for p in test["image_path"]]})
    answer = model.predict(images, params={"type_probabilities": True})
    defective = answer["label"] == "defective"
    assert defective.any() and (~defective).any()
    assert answer.loc[defective, "defect_type"].isin(CASTING_TYPES).all()
    assert answer.loc[~defective, "defect_type"].isna().all()  # an ok part has no type
    assert answer.loc[~defective, "defect_type_probability"].isna().all()
    shares = answer[[f"type_probability.{t}" for t in CASTING_TYPES]].to_numpy()
    assert np.allclose(shares.sum(1), 1.0, atol=1e-5)
    assert np.allclose(
        answer.loc[defective, "defect_type_probability"].astype(float),
        shares[defective.to_numpy()].max(1),
    )
    # what the scoring server sends: strict JSON, null (not NaN) where an ok part has no type
    from mlflow.pyfunc.scoring_server import predictions_to_json

    sent = io.StringIO()
    predictions_to_json(answer, sent)
    rows = json.loads(sent.getvalue(), parse_constant=lambda name: pytest.fail(name))
    ok_row = rows["predictions"][int(np.flatnonzero(~defective.to_numpy())[0])]
    assert ok_row["defect_type"] is None and ok_row["defect_type_probability"] is None

    csv = tmp_path / "predictions.csv"
    folder = str(typed_casting / "test")
    result = CliRunner().invoke(
        cli, ["predict", "--model", outcome.model_uri, folder, "-o", str(csv), "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    table = pd.read_csv(csv, keep_default_na=False)
    assert {"defect_type", "defect_type_probability"} <= set(table.columns)
    assert set(table.loc[table["label"] == "ok", "defect_type"]) == {""}

    out = tmp_path / "onnx"
    result = CliRunner().invoke(cli, ["export", "--model", outcome.model_uri, "-o", str(out)])
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "parity.json").read_text())  # type probabilities compared too
    assert parity["decisions_differ"] == 0 and parity["max_abs_difference"] <= 1e-4


def test_a_frozen_head_learns_types_from_cached_features(typed_casting, tiny_config):
    config = replace(
        tiny_config,
        data=replace(tiny_config.data, data_dir=typed_casting),
        model=ModelConfig(name="efficientnet_lite0", finetune="head", test_time_views=2),
        train=replace(tiny_config.train, epochs=2),
    )
    outcome = train(config, progress=False)
    assert outcome.result.net.defect_types == CASTING_TYPES
    assert outcome.evaluation.types is not None and outcome.evaluation.types.caught > 0


def test_without_types_the_columns_stay_as_before_and_asking_for_them_is_one_line(tiny_config):
    off = replace(tiny_config, model=replace(tiny_config.model, defect_types="off"))
    outcome = train(off, progress=False)
    model = mlflow.pyfunc.load_model(outcome.model_uri)
    image = Path(outcome.data.split_frame("test")["image_path"][0]).read_bytes()
    answer = model.predict(pd.DataFrame({"image": [image]}))
    assert list(answer.columns) == ["label", "defect_probability", "threshold"]
    with pytest.raises(Exception, match="learned no defect types") as refused:
        model.predict(pd.DataFrame({"image": [image]}), params={"type_probabilities": True})
    assert "\n" not in str(refused.value)


def test_a_type_metric_without_types_to_learn_is_one_line(typed_casting, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["tune", "--data-dir", str(typed_casting), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
         "--storage", str(tmp_path / "study.log"), "--metric", "val/type_macro_f1",
         "--defect-types", "off", "--no-progress"],
    )  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "--metric val/type_macro_f1" in error and "learn no defect types" in error


def test_a_types_table_that_disagrees_with_the_folder_is_named_by_line(tmp_path, caplog):
    from qi.data.discovery import DataLayoutError, discover
    from tests.helpers import make_class_folders

    make_class_folders(tmp_path, {"good": 4, "defect": 4})
    defects = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "defect").iterdir())
    good = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / "good").iterdir())
    table = tmp_path / "defect_types.csv"
    table.write_text(
        "path,defect_type\n"
        f"{defects[0]},crack\n"
        "defect/missing.png,crack\n"  # line 3: no such file
        f"{good[0]},burr\n"  # line 4: a good image given a defect's type
        f"{good[1]},none\n"  # a good image marked good: fine
    )
    with caplog.at_level("WARNING", logger="qi.data.discovery"):
        frame = discover(tmp_path).frame
    assert frame.loc[frame["image_path"].str.endswith(defects[0]), "defect_type"].item() == "crack"
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "line 3: defect/missing.png is not an image of" in warnings[0]
    assert f"line 4: {good[0]} is a good image typed 'burr'" in warnings[1]
    table.write_text(f"path,defect_type\n{defects[1]},good\n")
    typed_good = f"line 2: {defects[1]} is defective but typed 'good'"
    with pytest.raises(DataLayoutError, match=typed_good):
        discover(tmp_path)


def test_types_too_rare_to_learn_are_named_in_one_line():
    from qi.data.types import types_warning

    frame = _frame({"burr": MIN_TYPE_IMAGES, "crack": MIN_TYPE_IMAGES, "hole": 1})
    line = types_warning(frame, learnable_types(frame))
    assert "hole (1)" in line and "never named" in line and "\n" not in line
    alone = _frame({"burr": MIN_TYPE_IMAGES, "hole": 2})
    assert "no defect types learned" in types_warning(alone, learnable_types(alone))
    assert types_warning(_frame({"defective": 30}), ()) is None  # one kind: nothing to say
