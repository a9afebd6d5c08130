"""Cross-validated objectives of cheap trials: heads on cached features scored out of fold."""

from dataclasses import replace

import mlflow
import numpy as np
import pytest

from qi.config import ModelConfig, SearchSpace, TuneConfig
from qi.data.datamodule import prepare_data
from qi.fit.fitting import out_of_fold_probabilities
from qi.study import tune

HEAD = ModelConfig(name="efficientnet_lite0", finetune="head", pooling="avg", test_time_views=2)


def test_every_image_is_scored_by_a_head_that_did_not_see_it(tiny_config):
    config = replace(
        tiny_config,
        model=HEAD,
        data=replace(tiny_config.data, image_size=64),
        train=replace(tiny_config.train, epochs=3),
    )
    data = prepare_data(config.data, progress=False)
    labels, probabilities = out_of_fold_probabilities(config, data, folds=3)
    in_train_or_val = data.frame["split"].isin(["train", "val"])
    assert len(labels) == int(in_train_or_val.sum())
    assert sorted(labels.tolist()) == sorted(data.frame.loc[in_train_or_val, "label"].tolist())
    assert ((probabilities > 0) & (probabilities < 1)).all()
    # seeded: the same folds and heads give the same predictions
    again = out_of_fold_probabilities(config, data, folds=3)[1]
    np.testing.assert_allclose(again, probabilities, atol=1e-6)
    # a head that saw every image scores them otherwise than the held-out heads do
    two_folds = out_of_fold_probabilities(config, data, folds=2)[1]
    assert not np.allclose(two_folds, probabilities, atol=1e-3)


def test_cross_validation_refuses_a_network_that_learns_its_encoder(tiny_config):
    data = prepare_data(tiny_config.data, progress=False)
    with pytest.raises(ValueError, match="frozen pretrained encoder"):
        out_of_fold_probabilities(tiny_config, data, folds=3)


def test_folds_must_be_two_or_more():
    with pytest.raises(ValueError, match="2 and more folds"):
        TuneConfig(cv_folds=1)


@pytest.mark.slow
def test_a_study_of_heads_optimises_the_out_of_fold_figure(tiny_config):
    space = SearchSpace(
        batch_sizes=(16,),
        backbone_image_sizes=(64,),
        models=("efficientnet_lite0",),
        finetune=("head",),
        test_time_views=(1,),
    )
    study = TuneConfig(
        n_trials=2, epochs=3, timeout=None, space=space, study_name="cv", cv_folds=3,
        ensemble_candidates=0,
    )  # fmt: skip
    outcome = tune(tiny_config, study, progress=False)
    client = mlflow.MlflowClient()
    for trial in outcome.study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        metrics = run.data.metrics
        assert metrics["objective"] == pytest.approx(metrics["cv/f1"])
        assert trial.value == pytest.approx(metrics["cv/f1"])
        assert trial.user_attrs["val_loss"] == pytest.approx(metrics["cv/log_loss"])
        assert "val/f1" in metrics  # the split's own curve is still logged per epoch
