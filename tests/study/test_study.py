"""Optuna studies with real storage, real Lightning fits and a real sqlite MLflow store."""

import json
from dataclasses import replace

import mlflow
import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from qi.choices import HEAD_KINDS
from qi.config import DataConfig, ModelConfig, RunConfig, SearchSpace, TuneConfig
from qi.options import json_objects
from qi.storage import default_storage_path
from qi.study import best_trial, tune
from qi.study.space import (
    apply_params,
    learning_rate_range,
    load_search_space,
    params_of,
    resolve_study,
    starting_trials,
    suggest_params,
)

# the study's mechanics on CNNs alone; the backbones' part of the space has its own tests
TINY_SPACE = SearchSpace(
    batch_sizes=(16,), depth=(2, 3), widths=(4, 8), image_sizes=(32,), models=("cnn",)
)


def test_params_map_onto_the_config():
    trial = FixedTrial(
        {
            "train.learning_rate": 0.05,
            "train.optimizer": "sgd",
            "train.weight_decay": 1e-5,
            "data.batch_size": 64,
            "data.augment_strength": 0.1,
            "model.dropout": 0.3,
            "model.name": "cnn",
            "data.image_size": 96,
            "model.activation": "silu",
            "model.depth": 4,
            "model.width": 24,
            "model.pooling": "avg",
            "data.augmentation": "dihedral",
        }
    )
    config = apply_params(RunConfig(), suggest_params(trial, SearchSpace()))
    assert config.train.optimizer == "sgd" and config.model.width == 24
    assert config.data.image_size == 96 and config.data.batch_size == 64
    assert config.model.pooling == "avg" and config.data.augmentation == "dihedral"
    assert config.data.data_dir is None  # untouched fields stay


def test_a_fixed_image_size_holds_for_every_kind_of_trial():
    """`qi tune --image-size 128`: the CNN's, a pretrained backbone's and a detector's trials
    all at 128 px (the castings' own size), and the starting trials with them."""
    base, tune = resolve_study(RunConfig(), TuneConfig(image_size=128))
    assert tune.space.image_sizes == tune.space.backbone_image_sizes == (128,)
    assert base.data.image_size == 128
    for method in ("classifier", "anomaly"):
        sizes = {
            params.get("backbone.image_size", params.get("data.image_size"))
            for params in starting_trials(base, tune.space, method)
        }
        assert sizes == {128}, method


def test_sgd_samples_its_own_learning_rate_range():
    space = SearchSpace(optimizers=("adamw", "sgd"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = suggest_params(study.ask(), space)
        if "train.optimizer" not in params:  # a head scikit-learn fits
            continue
        low, high = learning_rate_range(space, params["train.optimizer"])
        assert low <= params["train.learning_rate"] <= high
    assert learning_rate_range(space, "sgd") == space.sgd_learning_rate
    assert learning_rate_range(space, "adam") == space.learning_rate


def test_best_trial_breaks_objective_ties_by_validation_loss():
    study = optuna.create_study(direction="maximize")
    for value, loss in ((0.99, 0.02), (1.0, 0.04), (0.98, 0.001), (1.0, 0.01), (1.0, 0.03)):
        study.add_trial(
            optuna.trial.create_trial(
                value=value,
                params={"x": 0.0},
                distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
                user_attrs={"val_loss": loss},
            )
        )
    assert study.best_trial.number == 1  # Optuna keeps the first of the tied 1.0s
    assert best_trial(study).number == 3  # the tied trial with the lowest loss
    assert best_trial(optuna.create_study()) is None


def test_default_configuration_is_a_starting_trial_when_inside_the_space():
    params = starting_trials(RunConfig(), SearchSpace())[-2]  # before the svm head
    assert apply_params(RunConfig(), params) == RunConfig()
    outside = starting_trials(RunConfig(), SearchSpace(image_sizes=(64,)))
    assert all(apply_params(RunConfig(), p) != RunConfig() for p in outside)


def test_search_space_file_and_enqueue_parsing(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"models": ["cnn", "resnet18"], "widths": [8]}))
    space = load_search_space(path)
    assert space.models == ("cnn", "resnet18") and space.widths == (8,)
    path.write_text(json.dumps({"modles": ["cnn"]}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_search_space(path)
    path.write_text(json.dumps({"models": ["vgg"]}))
    with pytest.raises(ValueError, match="unknown model"):
        load_search_space(path)
    path.write_text(json.dumps({"head_kinds": ["mlp", "forest"]}))
    with pytest.raises(ValueError, match=r"search space file .*forest.*logistic") as told:
        load_search_space(path)
    assert "\n" not in str(told.value)
    assert json_objects('{"model.width": 8}') == ({"model.width": 8},)
    with pytest.raises(ValueError, match="JSON"):
        json_objects("{not json")


def test_default_storage_sits_next_to_the_tracking_db(tmp_path):
    uri = f"sqlite:///{tmp_path / 'sub' / 'mlflow.db'}"
    assert default_storage_path(uri) == tmp_path / "sub" / "optuna-studies.journal"


class PruneTrial(optuna.pruners.BasePruner):
    """Prunes one chosen trial at its first report: a real pruner with a known outcome."""

    def __init__(self, number: int) -> None:
        self.number = number

    def prune(self, study, trial) -> bool:
        return trial.number == self.number


def _tiny_tune(tiny_config: RunConfig, **changes) -> TuneConfig:
    return replace(
        TuneConfig(n_trials=3, epochs=2, timeout=None, space=TINY_SPACE, study_name="tiny"),
        **changes,
    )


@pytest.mark.slow
def test_trials_are_nested_runs_with_pruned_and_failed_states(tiny_config, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-weights"))
    base = replace(tiny_config, model=replace(tiny_config.model, pretrained="imagenet"))
    space = replace(TINY_SPACE, models=("cnn", "mobilenet_v3_small"))
    # trial 0: qi train's defaults (cnn); trial 1: a backbone whose weights are missing -> FAIL
    config = _tiny_tune(
        tiny_config,
        space=space,
        n_trials=3,
        enqueue=(
            {"model.name": "mobilenet_v3_small"},
            {"model.name": "cnn"},
            {"model.name": "cnn"},
        ),
    )
    outcome = tune(base, config, progress=False, pruner=PruneTrial(number=2))
    states = {t.number: t.state for t in outcome.study.trials}
    assert states[1] == TrialState.FAIL and states[2] == TrialState.PRUNED
    finished = [
        t for t in outcome.study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    assert len(finished) == 3  # failures do not count towards n_trials

    client = mlflow.MlflowClient()
    parent = client.get_run(outcome.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'",
    )
    assert len(children) == len(outcome.study.trials)
    by_number = {int(r.data.tags["qi.trial_number"]): r for r in children}
    expected = {
        TrialState.COMPLETE: "FINISHED",
        TrialState.PRUNED: "KILLED",
        TrialState.FAIL: "FAILED",
    }
    for trial in outcome.study.trials:
        run = by_number[trial.number]
        assert run.info.status == expected[trial.state], trial.number
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
    assert "WeightsNotFoundError" in by_number[1].data.tags["qi.error"]
    assert by_number[2].data.tags["qi.trial_state"] == "pruned"
    pruned_curve = client.get_metric_history(by_number[2].info.run_id, "val/f1")
    assert len(pruned_curve) == 1  # its curve up to the prune
    complete = by_number[0]
    assert [m.step for m in client.get_metric_history(complete.info.run_id, "val/loss")] == [0, 1]
    assert complete.data.params["train.learning_rate"]
    assert "objective" in complete.data.metrics

    assert parent.data.tags["qi.kind"] == "tune" and parent.data.tags["qi.study_name"] == "tiny"
    assert parent.data.params["tune.metric"] == "val/f1"
    assert "best_value" in parent.data.metrics and "test/acc" in parent.data.metrics
    assert parent.data.params["best.model.name"] == "cnn"
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id, "study")}
    assert {"study/trials.csv", "study/optimization_history.png"} <= artifacts
    assert outcome.model_uri and mlflow.pyfunc.load_model(outcome.model_uri)

    # the best model is evaluated, registered and, with no champion yet, promoted
    evaluation_files = {a.path for a in client.list_artifacts(outcome.parent_run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/classification_report.json",
        "evaluation/roc_pr_curves.png",
        "evaluation/summary.md",
    } <= evaluation_files
    assert outcome.registered_version == "1" and outcome.decision.alias == "champion"
    version = client.get_model_version_by_alias("quality-inspector", "champion")
    assert version.run_id == outcome.parent_run_id  # the registry page links to the report
    assert version.tags["qi.study_name"] == "tiny" and version.tags["qi.data_digest"]
    assert "Best trial" in version.description
    threshold = float(version.tags["qi.threshold"])
    assert parent.data.metrics["threshold"] == pytest.approx(threshold)
    served = mlflow.pyfunc.load_model("models:/quality-inspector@champion")
    assert served.metadata.get_params_schema().params[0].default == pytest.approx(threshold)


@pytest.mark.slow
def test_a_second_tune_resumes_the_study(tiny_config):
    first = tune(tiny_config, _tiny_tune(tiny_config, n_trials=2), progress=False)
    assert len(first.study.trials) == 2
    second = tune(tiny_config, _tiny_tune(tiny_config, n_trials=3), progress=False)
    trials = second.study.trials
    assert len(trials) == 3 and [t.number for t in trials] == [0, 1, 2]
    client = mlflow.MlflowClient()
    parent = client.get_run(second.parent_run_id)
    assert parent.data.tags["qi.continues_study"] == "true"
    assert parent.data.metrics["trials_before"] == 2
    children = client.search_runs(
        [parent.info.experiment_id], filter_string="tags.`qi.kind` = 'trial'"
    )
    assert sorted(int(r.data.tags["qi.trial_number"]) for r in children) == [0, 1, 2]
    by_parent = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert by_parent == {first.parent_run_id, second.parent_run_id}
    # a finished study is not run again
    third = tune(tiny_config, _tiny_tune(tiny_config, n_trials=3), progress=False)
    assert len(third.study.trials) == 3


@pytest.mark.slow
def test_a_trial_cut_by_the_deadline_is_pruned_once_the_study_has_a_model(tiny_config):
    # 400 epochs never fit in 3 s: every trial is cut by the deadline
    config = _tiny_tune(tiny_config, n_trials=1, epochs=400, timeout=3.0, pruner="none")
    first = tune(tiny_config, config, progress=False)
    (trial_0,) = first.study.trials
    # the study's only trial stays complete: the study must still yield a model
    assert trial_0.state == TrialState.COMPLETE and first.model_uri is not None
    second = tune(tiny_config, replace(config, n_trials=2), progress=False)
    trial_1 = second.study.trials[1]
    assert trial_1.state == TrialState.PRUNED
    client = mlflow.MlflowClient()
    run = client.get_run(trial_1.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"
    assert run.data.tags["qi.trial_state"] == "pruned"
    # stopped by the deadline, or sooner by the budget check: at its pace it could not reach
    # epoch 200 (where early stopping may act) in 3 s
    assert run.data.tags["qi.pruned_by"] in ("deadline", "budget")
    assert 0 < len(client.get_metric_history(run.info.run_id, "val/loss")) < 400
    assert second.best_trial.number == 0


def test_same_seed_same_trial_params(tiny_config):
    space = replace(
        TuneConfig().space,
        image_sizes=(32,),
        backbone_image_sizes=(32,),  # the whole space's kinds, at the tiny images' size
        batch_sizes=(16,),
        widths=(4,),
        depth=(2, 2),
    )
    studies = []
    for name in ("first", "second"):
        config = TuneConfig(
            study_name=name, n_trials=3, epochs=1, timeout=None, space=space, seed=7, pruner="none"
        )
        studies.append(
            tune(tiny_config, replace(config, start_with_defaults=False), progress=False).study
        )
    assert [t.params for t in studies[0].trials] == [t.params for t in studies[1].trials]


def test_the_space_is_conditional_on_the_kind_of_model():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    kinds = set()
    for _ in range(60):
        params = suggest_params(study.ask(), SearchSpace())
        config = apply_params(RunConfig(), params)
        if params["model.name"] == "cnn":
            kinds.add("cnn")
            assert "model.finetune" not in params and "model.depth" in params
            assert config.data.image_size in SearchSpace().image_sizes
        elif params["model.finetune"] == "head":
            kinds.add("head")
            # augmentation is the cached views; what varies is the head and the test views
            assert "data.augmentation" not in params and "model.test_time_views" in params
            assert config.data.image_size == 224
        else:
            kinds.add("fine-tune")
            assert "train.encoder_lr_scale" in params and "data.augmentation" in params
    assert kinds == {"cnn", "head", "fine-tune"}


def test_heads_fitted_by_scikit_learn_sample_their_c_and_no_optimiser():
    """A logistic or svm head has its own C and none of the gradient fit's settings; an mlp
    head keeps them; the kind is sampled for frozen encoders only."""
    space = SearchSpace(
        models=("efficientnet_lite0",), finetune=("head", "all"), head_kinds=HEAD_KINDS
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(80):
        params = suggest_params(study.ask(), space)
        config = apply_params(RunConfig(), params)
        if params["model.finetune"] != "head":
            assert "model.head_kind" not in params and "train.optimizer" in params
            continue
        kind = params["model.head_kind"]
        seen.add(kind)
        assert config.model.head_kind == kind
        gradient = {"train.optimizer", "train.learning_rate", "data.batch_size"}
        if kind == "mlp":
            assert gradient <= set(params) and "model.head_hidden" in params
            continue
        assert not gradient & set(params) and "model.head_hidden" not in params
        low, high = space.logistic_c if kind == "logistic" else space.svm_c
        assert low <= config.model.head_c <= high
        assert params == params_of(config)  # a trial to enqueue reads back the same
    assert seen == set(HEAD_KINDS)


def test_a_new_study_starts_cheap_then_with_qi_trains_configuration():
    space = SearchSpace(feature_stages=("none", "32", "16,32"))
    first, staged, hidden, hidden_staged, second, svm, svm_staged = starting_trials(
        RunConfig(), space
    )
    head = apply_params(RunConfig(), first)
    assert head.model.name == "efficientnet_lite0" and head.model.finetune == "head"
    assert head.model.test_time_views == 8 and head.model.head_kind == "logistic"
    assert head.model.head_c == 0.01 and "train.optimizer" not in first
    assert head.model.feature_stages == () and first["model.feature_stages"] == "none"
    # the same heads reading the stride 16 and 32 stages too: the same cached encoder pass
    assert apply_params(RunConfig(), staged).model.feature_stages == (16, 32)
    assert apply_params(RunConfig(), hidden).model.head_kind == "mlp"
    assert apply_params(RunConfig(), hidden).model.head_hidden == 256
    assert apply_params(RunConfig(), hidden_staged).model.feature_stages == (16, 32)
    assert apply_params(RunConfig(), second) == RunConfig()
    # the dearer svm head after qi train's configuration
    assert apply_params(RunConfig(), svm).model.head_kind == "svm"
    assert apply_params(RunConfig(), svm).model.head_c == 10.0
    assert apply_params(RunConfig(), svm_staged).model.feature_stages == (16, 32)
    # the default space, without staged features, starts with the last map's heads only
    assert len(starting_trials(RunConfig(), SearchSpace())) == 4
    (only,) = starting_trials(RunConfig(), SearchSpace(models=("cnn",)))
    assert only == second
    # where no logistic head may run, the linear one is fitted by gradient
    linear, hidden, _ = starting_trials(RunConfig(), SearchSpace(head_kinds=("mlp",)))
    assert apply_params(RunConfig(), linear).model.head_hidden == 0
    assert apply_params(RunConfig(), linear).model.head_kind == "mlp"


def test_backbones_do_not_look_at_images_larger_than_the_files():
    from qi.study.trials import no_larger_than_the_files

    config = RunConfig(
        model=ModelConfig(name="efficientnet_lite0"), data=DataConfig(image_size=224)
    )
    assert no_larger_than_the_files(config, 128).data.image_size == 128
    assert no_larger_than_the_files(config, 100).data.image_size == 128  # next multiple of 32
    assert no_larger_than_the_files(config, 300).data.image_size == 224
    assert no_larger_than_the_files(RunConfig(), 64).data.image_size == 128  # a CNN: as asked


def test_a_trial_that_cannot_finish_in_the_budget_stops_after_an_epoch():
    import time

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from qi.study.trials import BudgetCheck, BudgetPruned

    class Slow(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            time.sleep(0.3)
            return (self.weight * batch[0]).sum()

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", 1.0)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(may_stop: bool) -> int:
        # 10 epochs of 0.3 s must run before early stopping may act; 1 s is left
        check = BudgetCheck(time.monotonic() + 1.0, needed_epochs=10, may_stop=lambda: may_stop)
        loader = DataLoader(TensorDataset(torch.ones(1, 1)), batch_size=1)
        trainer = pl.Trainer(
            max_epochs=3, callbacks=[check], logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        )  # fmt: skip
        trainer.fit(Slow(), loader, loader)
        return trainer.current_epoch

    with pytest.raises(BudgetPruned, match="cannot reach epoch 10"):
        fit(may_stop=True)
    assert fit(may_stop=False) == 3  # the study's first model is never stopped
