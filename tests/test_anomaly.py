"""Good-only detection: defects judge and never train, one model surface for both methods."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import roc_auc_score

from qi.anomaly.fitting import detector_data
from qi.anomaly.localisation import mask_path
from qi.anomaly.method import MIN_CLASSIFIER_DEFECTS, choose_method
from qi.cli import cli
from qi.config import (
    DataConfig,
    DetectorConfig,
    EvaluationConfig,
    ModelConfig,
    RunConfig,
    SearchSpace,
    SynthConfig,
    TrackingConfig,
    TuneConfig,
)
from qi.data import synth
from qi.data.datamodule import prepare_data
from qi.heatmaps import heatmaps
from qi.inference import ModelSpec, defect_probabilities, load_network
from qi.models.memory_bank import bank_size, greedy_coreset
from qi.storage import StorageError
from qi.study.space import apply_params, params_of
from qi.study.worker import check_study_method
from qi.tags import Tag
from tests.helpers import peaks_in_defect_boxes

SIZE = 96


@pytest.fixture(scope="module")
def castings(tmp_path_factory) -> Path:
    return synth.generate(
        tmp_path_factory.mktemp("castings"),
        SynthConfig(n_train=300, n_test=60, image_size=SIZE, seed=5),
        progress=False,
    )


def _config(root: Path, **detector) -> RunConfig:
    return RunConfig(
        data=DataConfig(data_dir=root, image_size=SIZE),
        tracking=TrackingConfig(experiment="qi-test"),
        detector=DetectorConfig(method="anomaly", **detector),
    )


@pytest.fixture(scope="module")
def detector(castings, tmp_path_factory):
    """One detector of the castings, trained once for the module, in its own store."""
    from qi.train import train

    store = tmp_path_factory.mktemp("store")
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    config = _config(castings, neighbourhood=1)  # 96 px: a 3-cell average blurs pin holes
    config = replace(
        config, tracking=replace(config.tracking, tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    )
    outcome = train(config, progress=False)
    outcome.tracking_uri = config.tracking.tracking_uri
    return outcome


def test_defects_judge_and_never_train(castings, detector):
    """The bank's images are good ones; the test split is the classifier's own."""
    classifier_split = prepare_data(DataConfig(data_dir=castings, image_size=SIZE), progress=False)
    frame = detector.data.frame
    assert (frame.loc[frame["split"] == "train", "label"] == 0).all()
    assert (frame.loc[frame["split"] == "val", "label"] == 1).any()
    test = lambda f: sorted(f.loc[f["split"] == "test", "image_path"])  # noqa: E731
    assert test(frame) == test(classifier_split.frame)
    moved = classifier_split.frame[
        (classifier_split.frame["split"] == "train") & (classifier_split.frame["label"] == 1)
    ]["image_path"]
    assert set(moved) <= set(frame.loc[frame["split"] == "val", "image_path"])
    mlflow.set_tracking_uri(detector.tracking_uri)
    run = mlflow.get_run(detector.run_id)
    assert run.data.tags[Tag.METHOD] == "anomaly"
    assert run.data.metrics["bank_patches"] == len(detector.result.net.memory_bank)
    assert detector.result.net.memory_bank.dtype == torch.float16
    # detecting, not guessing: the castings' test split is separated
    images, labels = detector.data.split("test")
    assert roc_auc_score(labels, defect_probabilities(detector.result.net, images)) > 0.9


def test_served_model_scores_as_the_trained_one(detector):
    mlflow.set_tracking_uri(detector.tracking_uri)
    model = mlflow.pyfunc.load_model(detector.model_uri)
    paths = detector.data.split_frame("test")["image_path"].tolist()[:12]
    frame = pd.DataFrame({"image": [Path(p).read_bytes() for p in paths]})
    out = model.predict(frame, params={"explain": True})
    assert list(out.columns[:3]) == ["label", "defect_probability", "threshold"]
    assert (out["threshold"] == 0.5).all()
    assert out["defect_probability"].between(0, 1).all()
    assert out["heatmap"].map(lambda b: b[:4] == b"\x89PNG").all()
    images, _ = detector.data.split("test")
    expected = defect_probabilities(detector.result.net, images[:12])
    np.testing.assert_allclose(out["defect_probability"], expected, atol=1e-5)


def test_detectors_logged_before_zero_padding_keep_their_averaging(detector, tmp_path):
    """A spec of a detector fitted before neighbourhoods counted the zeros beyond the border
    (no ``zero_padding`` key) loads with the averaging it was fitted with."""
    net = detector.result.net
    spec = ModelSpec(
        model=ModelConfig(name="efficientnet_lite0"),
        preprocess=detector.data.preprocess,
        method="anomaly",
        detector=DetectorConfig(method="anomaly", neighbourhood=3),
    )
    raw = json.loads(spec.to_json())
    assert raw["detector"].pop("zero_padding") is True
    earlier = ModelSpec.from_json(json.dumps(raw))
    assert earlier.detector.zero_padding is False
    torch.save(net.state_dict(), tmp_path / "weights.pt")
    loaded = load_network(earlier, tmp_path / "weights.pt")
    current = load_network(spec, tmp_path / "weights.pt")
    assert loaded.zero_padding is False and current.zero_padding is True
    images = torch.from_numpy(detector.data.split("test")[0][:2]).permute(0, 3, 1, 2)
    with torch.inference_mode():
        inside, zeros = (n.patch_features(images) for n in (loaded, current))
    assert not torch.allclose(inside[..., 0, 0], zeros[..., 0, 0])  # the border differs
    finest = net.encoder.feature_info[net.stage_indices[0]].channels  # (the coarser map is
    # resized onto the finest grid, its border reaching further in)
    torch.testing.assert_close(inside[:, :finest, 1:-1, 1:-1], zeros[:, :finest, 1:-1, 1:-1])


def test_anomaly_map_peaks_inside_the_defect_box(castings, detector):
    """The smoothed map's maximum lies in the box the synth recorded (dilated by one
    stride-8 patch) for most defective test images, far more often than in another's box."""
    images, _ = detector.data.split("test")
    maps = heatmaps(detector.result.net, images)
    assert maps.shape == images.shape[:3] and maps.min() >= 0 and maps.max() <= 1
    defective, hits, chance = peaks_in_defect_boxes(castings, detector.data, maps, margin=8)
    assert defective >= 20
    assert hits >= 0.7 * defective, (hits, defective)
    assert hits >= 2 * chance, (hits, chance)


def test_onnx_export_carries_the_bank_with_parity(detector, tmp_path):
    from qi.export import export_model

    mlflow.set_tracking_uri(detector.tracking_uri)
    export = export_model(detector.model_uri, tmp_path / "onnx", publish=False)
    assert export.parity.holds, export.parity
    assert export.parity.images == int((detector.data.frame["split"] == "test").sum())


def test_coreset_is_bounded_and_covers_far_points():
    assert bank_size(10_000_000, 0.01, 16384, 200_000) == 16384
    assert bank_size(1_000_000, 0.01, 16384, 200_000) == 10_000
    assert bank_size(1000, 0.01, 16384, 1000) == 1000  # the floor, capped by the candidates
    cloud = torch.cat([torch.zeros(500, 4), torch.full((1, 4), 100.0)])
    chosen = greedy_coreset(cloud, 2, seed=0)
    assert 500 in chosen.tolist()  # the lone far patch is kept, not averaged away


def test_auto_rule():
    def frame(defects: int) -> pd.DataFrame:
        rows = [(f"g{i}", 0, "train") for i in range(50)]
        rows += [(f"d{i}", 1, "train") for i in range(defects)]
        rows += [("t", 1, "test")] * 30
        return pd.DataFrame(rows, columns=["image_path", "label", "split"])

    assert choose_method("auto", frame(MIN_CLASSIFIER_DEFECTS), "class_folders")[0] == "classifier"
    method, why = choose_method("auto", frame(MIN_CLASSIFIER_DEFECTS - 1), "class_folders")
    assert method == "anomaly" and "fewer than" in why
    assert choose_method("auto", frame(100), "mvtec")[0] == "anomaly"
    assert choose_method("classifier", frame(0), "class_folders")[0] == "classifier"


@pytest.fixture(scope="module")
def good_only(castings, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good-only")
    shutil.copytree(castings / "train" / "ok_front", root / "good")
    return root


def test_good_only_folder_trains_a_detector_by_default(good_only):
    result = CliRunner().invoke(
        cli, ["train", "--data-dir", str(good_only), "--image-size", "64", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    assert "method: anomaly (auto: 0 defective image(s) outside test" in result.output
    assert "no defect recall was measured" in result.output


def test_good_only_errors_are_one_line_before_fitting(good_only, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        cli, ["train", "--data-dir", str(good_only), "--method", "classifier", "--no-progress"]
    )
    assert result.exit_code != 0
    assert "--method anomaly" in result.output and "Traceback" not in result.output
    few = tmp_path / "few" / "good"
    few.mkdir(parents=True)
    for path in sorted((good_only / "good").iterdir())[:6]:
        shutil.copy(path, few)
    result = runner.invoke(cli, ["train", "--data-dir", str(few.parent), "--no-progress"])
    assert result.exit_code != 0 and "at least 10" in result.output
    with pytest.raises(ValueError, match="--target-recall"):
        from qi.anomaly.fitting import fit_detector

        config = replace(_config(good_only), evaluation=EvaluationConfig(target_recall=0.9))
        data = prepare_data(config.data, progress=False, good_only=True)
        fit_detector(config, detector_data(data, 0))


def test_mvtec_keeps_train_good_for_the_bank(castings, tmp_path):
    """An MVTec AD category: train/good is the bank, its test folder halves into val and
    test, stratified by defect type."""
    root = tmp_path / "bottle"
    shutil.copytree(castings / "train" / "ok_front", root / "train" / "good")
    shutil.copytree(castings / "test" / "ok_front", root / "test" / "good")
    shutil.copytree(castings / "test" / "def_front", root / "test" / "crack")
    data = prepare_data(DataConfig(data_dir=root, image_size=SIZE), progress=False, good_only=True)
    assert choose_method("auto", data.frame, data.layout)[0] == "anomaly"
    split = detector_data(data, seed=0).frame
    in_train = split["image_path"].str.contains("/train/")
    assert (split.loc[in_train, "split"] == "train").all()
    assert set(split.loc[~in_train, "split"]) == {"val", "test"}
    held = split[~in_train]
    for name in ("val", "test"):
        assert (held.loc[held["split"] == name, "label"] == 1).any()


def test_model_config_names_the_backbone_the_detector_used(detector):
    mlflow.set_tracking_uri(detector.tracking_uri)
    model = mlflow.pyfunc.load_model(detector.model_uri).unwrap_python_model()
    assert model.spec.method == "anomaly"
    assert model.spec.model.name == "efficientnet_lite0"
    assert model.spec.detector.stage_strides == (8, 16)


@pytest.mark.slow
def test_tune_searches_detector_settings_and_registers_the_best(castings, tmp_path):
    """qi tune --method anomaly: trials are nested runs over the detector's settings (no
    optimiser), the first is qi train's, and the best is evaluated, registered and served
    as a detector."""
    from qi.study import tune

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    base = _config(castings)
    base = replace(base, tracking=replace(base.tracking, tracking_uri=uri))
    config = TuneConfig(n_trials=2, timeout=None, study_name="detectors", model_name="casting")
    outcome = tune(base, config, progress=False)
    assert outcome.method == "anomaly"
    first, second = outcome.study.trials
    assert first.params == {
        "model.name": "efficientnet_lite0",
        "backbone.image_size": 224,
        "detector.stage_strides": "8,16",
        "detector.neighbourhood": 3,
        "detector.coreset_ratio": 0.01,
        "detector.neighbours": 1,
        "detector.top_patches": 1,
    }
    assert second.params.keys() == first.params.keys()
    client = mlflow.MlflowClient()
    children = client.search_runs(
        [client.get_run(outcome.parent_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    assert len(children) == 2
    for run in children:
        assert run.data.tags[Tag.METHOD] == "anomaly" and run.info.status == "FINISHED"
        assert run.data.metrics["bank_patches"] > 0 and "objective" in run.data.metrics
    assert client.get_run(outcome.parent_run_id).data.tags[Tag.METHOD] == "anomaly"
    version = client.get_model_version("casting", outcome.registered_version)
    assert version.description.startswith("A good-only detector")
    served = mlflow.pyfunc.load_model("models:/casting@champion").unwrap_python_model()
    assert served.spec.method == "anomaly" and served.spec.threshold == 0.5
    assert served.spec.preprocess.image_size == SIZE  # no larger than the files


def test_detector_search_round_trips_its_settings():
    """A detector's config -> Optuna params (strides as plain text) -> the same config."""
    config = _config(Path("."), stage_strides=(4, 8), neighbourhood=5)
    config = replace(config, model=replace(config.model, name="efficientnet_lite0"))
    params = params_of(config, "anomaly")
    assert params["detector.stage_strides"] == "4,8"
    assert apply_params(RunConfig(), params).detector == replace(
        DetectorConfig(), stage_strides=(4, 8), neighbourhood=5
    )
    with pytest.raises(ValueError, match="comma list"):
        SearchSpace(detector_strides=("8;16",))


def test_tune_refuses_a_detector_study_without_defects_to_rank_on(good_only, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["tune", "--data-dir", str(good_only), "--tracking-uri", f"sqlite:///{tmp_path}/m.db",
         "--no-progress"],
    )  # fmt: skip
    assert result.exit_code != 0 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert "qi train --method anomaly" in error and "has 0 (needs 5)" in error


def test_a_study_keeps_one_method():
    """Classifier and detector objectives are measured on different validation splits."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(value=0.5))  # a study from before the option
    with pytest.raises(StorageError, match="--method classifier"):
        check_study_method(study, "anomaly", "old")
    check_study_method(study, "classifier", "old")
    with pytest.raises(StorageError, match="holds classifier trials"):
        check_study_method(study, "anomaly", "old")


@pytest.mark.slow
def test_mvtec_masks_give_a_pixel_auroc(castings, tmp_path):
    """An MVTec AD category with ground_truth masks (the synth's defect boxes): the run
    logs the pixel ROC AUC of the anomaly maps, far above chance."""
    from qi.train import train

    root = tmp_path / "casting"
    shutil.copytree(castings / "train" / "ok_front", root / "train" / "good")
    shutil.copytree(castings / "test" / "ok_front", root / "test" / "good")
    shutil.copytree(castings / "test" / "def_front", root / "test" / "defect")
    (root / "ground_truth" / "defect").mkdir(parents=True)
    with open(castings / synth.MANIFEST) as manifest:
        for row in csv.DictReader(manifest):
            if row["path"].startswith("test/def_front/"):
                x0, y0, x1, y1 = (int(row[k]) for k in synth.REGION_COLUMNS)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                mask[y0 : y1 + 1, x0 : x1 + 1] = 255
                cv2.imwrite(
                    str(mask_path(root / row["path"].replace("def_front", "defect"), root)), mask
                )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(root, neighbourhood=1)
    config = replace(config, tracking=replace(config.tracking, tracking_uri=uri, log_model=False))
    outcome = train(config, progress=False)
    metrics = outcome.evaluation.metrics
    assert metrics["pixel_auroc_images"] == len(outcome.data.split_frame("test"))
    assert metrics["pixel_auroc"] > 0.85, metrics["pixel_auroc"]
    mlflow.set_tracking_uri(uri)
    assert mlflow.get_run(outcome.run_id).data.metrics["test/pixel_auroc"] == metrics["pixel_auroc"]


def test_a_trial_whose_weights_upload_fails_ends_failed(castings, tmp_path):
    """The artifact store fails after the fit (its root lies under a file): the trial's run
    still ends, FAILED with the error, and Optuna records the trial as failed."""
    from qi.study.trials import DataByImageSize, TrialRunner

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("broken-artifacts", artifact_location="/dev/null/qi")
    parent = mlflow.MlflowClient().create_run(experiment).info.run_id
    base = _config(castings, neighbourhood=1)
    data = DataByImageSize(base, progress=False)
    data.use_method("anomaly")
    tune = TuneConfig(n_trials=1, timeout=None)
    study = optuna.create_study(direction="maximize")
    study.optimize(
        TrialRunner(base, tune, parent, data, None, False), n_trials=1, catch=(Exception,)
    )
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.FAIL
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and run.data.tags["qi.trial_state"] == "failed"
    assert "bank_patches" in run.data.metrics  # it failed after the fit, at the upload
    assert "/dev/null" in run.data.tags["qi.error"]
