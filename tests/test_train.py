"""One real training run: Lightning trainer, sqlite MLflow store, logged pyfunc model."""

from pathlib import Path

import lightning.pytorch as pl
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from qi.choices import metric_mode, validate_metric
from qi.fit.callbacks import WarmEarlyStopping
from qi.train import train


def test_metric_names():
    assert metric_mode("val/loss") == "min" and metric_mode("val/f1") == "max"
    assert validate_metric("val/auroc") == "val/auroc"
    with pytest.raises(ValueError, match="val/defect_recall"):
        validate_metric("val/bogus")


def test_one_epoch_run_is_fully_tracked(tiny_config):
    from dataclasses import replace

    config = replace(tiny_config, train=replace(tiny_config.train, epochs=2))
    outcome = train(config, progress=False)
    client = mlflow.MlflowClient()
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "2" and run.data.params["model.width"] == "8"
    assert run.data.params["data.image_size"] == "32"
    for key in ("qi.version", "qi.data_digest", "qi.data_layout", "qi.data_root"):
        assert run.data.tags[key], key
    assert run.data.tags["qi.data_digest"] == outcome.data.digest
    # per-epoch curves, one point per epoch at step = epoch
    for key in ("train/loss", "val/loss", "val/acc", "val/f1", "val/auroc", "val/defect_recall"):
        history = client.get_metric_history(outcome.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    for key in ("test/acc", "test/f1", "test/auroc", "test/defect_recall", "best_val_loss"):
        assert key in run.data.metrics, key
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == outcome.data.digest
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "data")}
    assert "data/split_counts.csv" in artifacts

    model = mlflow.pyfunc.load_model(outcome.model_uri)
    frame = outcome.data.split_frame("test").head(3)
    payload = pd.DataFrame({"image": [Path(p).read_bytes() for p in frame["image_path"]]})
    predictions = model.predict(payload)
    assert list(predictions.columns) == ["label", "defect_probability", "threshold"]
    assert predictions["defect_probability"].between(0, 1).all()
    assert set(predictions["label"]) <= {"ok", "defective"}
    # the served model scores exactly as the trained network does
    from qi.inference import defect_probabilities

    expected = defect_probabilities(outcome.result.net, outcome.data.split("test")[0][:3])
    assert predictions["defect_probability"].to_numpy() == pytest.approx(expected, abs=1e-5)


class ConstantValidation(pl.LightningModule):
    """Learns nothing and reports the same validation loss every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return (self.weight * batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", 1.0)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(("after", "epochs_run"), [(0, 2), (4, 5)])
def test_early_stopping_waits_until_its_start(after, epochs_run):
    loader = DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)
    stopper = WarmEarlyStopping(monitor="val/loss", patience=1, min_epochs=after)
    trainer = pl.Trainer(
        max_epochs=8,
        accelerator="cpu",
        callbacks=[stopper],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ConstantValidation(), loader, loader)
    # first check sets the best score, the next one without improvement stops (patience 1)
    assert trainer.current_epoch == epochs_run


def test_a_frozen_backbone_trains_its_head_on_cached_features_and_serves_whole(tiny_config):
    """The head learns from cached features of flipped/rotated copies; the logged model,
    scoring raw images end to end with 8 test-time views, agrees with those features."""
    from dataclasses import replace

    from qi.data.embeddings import embeddings
    from qi.models.parts import HeadOnViews

    model = replace(
        tiny_config.model,
        name="efficientnet_lite0",
        finetune="head",
        pooling="avgmax",
        test_time_views=8,
    )
    config = replace(
        tiny_config,
        model=model,
        data=replace(tiny_config.data, image_size=64),
        train=replace(tiny_config.train, epochs=3),
    )
    outcome = train(config, progress=False)
    run = mlflow.MlflowClient().get_run(outcome.run_id)
    assert run.data.params["model.finetune"] == "head" and "test/auroc" in run.data.metrics
    net = outcome.result.net
    images, _ = outcome.data.split("val")
    cached = embeddings(net, images, views=8, progress=False)  # what the head trained against
    with torch.no_grad():
        from_cache = torch.sigmoid(HeadOnViews(net.head)(torch.from_numpy(cached).transpose(0, 1)))
    model_uri = outcome.model_uri
    frame = outcome.data.split_frame("val")
    served = mlflow.pyfunc.load_model(model_uri).predict(
        pd.DataFrame({"image": [Path(p).read_bytes() for p in frame["image_path"]]})
    )
    assert served["defect_probability"].to_numpy() == pytest.approx(from_cache.numpy(), abs=5e-3)


@pytest.mark.slow
def test_an_svm_head_trains_serves_explains_and_exports(tiny_casting, tmp_path):
    """`qi train --head-kind svm`: scikit-learn fits the head once (one validation pass is its
    curve), the registered pyfunc answers as the head on cached features, Grad-CAM explains
    through the kernel and the ONNX export keeps every decision."""
    from click.testing import CliRunner

    from qi.cli import cli
    from qi.data.embeddings import embeddings
    from qi.models.parts import HeadOnViews

    arguments = ["train", "--data-dir", str(tiny_casting), "--model", "efficientnet_lite0"]
    arguments += ["--finetune", "head", "--head-kind", "svm", "--head-c", "3", "--image-size"]
    arguments += ["64", "--test-time-views", "2", "--no-progress"]
    result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 0, result.output
    (run,) = mlflow.search_runs(experiment_names=["qi"], output_format="list")
    assert run.data.params["model.head_kind"] == "svm" and "test/auroc" in run.data.metrics
    client = mlflow.MlflowClient()
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [0]
    model_uri = f"runs:/{run.info.run_id}/model"
    model = mlflow.pyfunc.load_model(model_uri)
    net = model.unwrap_python_model().net
    assert len(net.head[1].support) > 0  # the support vectors travelled as tensors
    files = sorted(tiny_casting.rglob("*.png"))[:6]
    served = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    from qi.data.preprocessing import load_and_preprocess

    spec = model.unwrap_python_model().spec
    images = np.stack([load_and_preprocess(str(f), spec.preprocess) for f in files])
    cached = embeddings(net, images, views=2, progress=False)
    with torch.no_grad():
        expected = torch.sigmoid(HeadOnViews(net.head)(torch.from_numpy(cached).transpose(0, 1)))
    np.testing.assert_allclose(served["defect_probability"], expected.numpy(), atol=5e-3)

    out = tmp_path / "explained"
    done = CliRunner().invoke(
        cli, ["explain", "--model", model_uri, "-o", str(out), *[str(f) for f in files[:2]]]
    )
    assert done.exit_code == 0, done.output
    assert len(list(out.glob("*.png"))) == 2
    done = CliRunner().invoke(cli, ["export", "--model", model_uri, "-o", str(tmp_path / "onnx")])
    assert done.exit_code == 0, done.output
    assert "0 decisions differ" in done.output
