"""The trial runner: one Optuna trial = one nested MLflow run of one Lightning fit.

A trial's child run is created before anything can fail, so every trial is logged exactly
once, and it always ends: FINISHED (complete), KILLED (pruned, by the pruner or the study's
deadline, or interrupted) or FAILED, with :attr:`qi.tags.Tag.TRIAL_STATE` saying which. A
complete trial leaves its weights and spec on its run (``trial_model/``), so the best trial
can be picked up by any worker, later.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from qi.anomaly.fitting import detector_data, fit_detector
from qi.config import RunConfig, TuneConfig
from qi.data.datamodule import PreparedData, prepare_data
from qi.evaluation.metrics import METRIC_FUNCTIONS, binary_metrics
from qi.fit import FitResult, fit
from qi.fit.estimators import fitted_by_scikit_learn, svm_fit_seconds
from qi.fit.fitting import out_of_fold_probabilities
from qi.inference import ModelSpec, load_network, trained_state
from qi.models import has_frozen_encoder
from qi.models.patchcore import detector_backbone
from qi.study.recovery import worker_id
from qi.study.space import apply_params, suggest_params
from qi.tags import Artifact, Kind, Tag, TrialAttr
from qi.tags import TrialState as RunTrialState
from qi.tracking import (
    download_run_artifacts,
    end_run,
    log_artifact_folder,
    log_config,
    log_metrics,
    set_tags,
    standard_tags,
    start_child_run,
)

log = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


class DataByImageSize:
    """Prepared data per image size, shared by every trial of this worker.

    Until :meth:`use_method` says which method the study runs, a folder of good images only
    is accepted unless the user asked for a classifier; a detector's study then gets the
    detector's splits (:func:`qi.anomaly.fitting.detector_data`) at every size.
    """

    def __init__(self, base: RunConfig, progress: bool) -> None:
        self.base, self.progress = base, progress
        self.method: str | None = None
        self._prepared: dict[int, PreparedData] = {}

    def use_method(self, method: str) -> None:
        self.method = method
        if method == "anomaly":
            self._prepared = {
                size: detector_data(data, self.base.data.seed)
                for size, data in self._prepared.items()
            }

    def get(self, image_size: int) -> PreparedData:
        if image_size not in self._prepared:
            config = replace(self.base.data, image_size=image_size)
            if self.method is None:  # not chosen yet: accept what the asked method could use
                good_only = self.base.detector.method != "classifier"
            else:
                good_only = self.method == "anomaly"
            data = prepare_data(config, self.base.synth, self.progress, good_only=good_only)
            if self.method == "anomaly":
                data = detector_data(data, self.base.data.seed)
            self._prepared[image_size] = data
        return self._prepared[image_size]

    @property
    def source_size(self) -> int | None:
        """The images' own resolution (median shorter side of the files)."""
        return self.get(self.base.data.image_size).source_size


class BudgetPruned(optuna.TrialPruned):
    """A trial stopped because, at its own pace, it could not finish in the study's time."""


class DeadlinePruned(optuna.TrialPruned):
    """A trial whose fit the study's deadline cut short (after its first complete one)."""


class BudgetCheck(Callback):
    """Stops a trial after an epoch when, at the pace of its epochs so far, it cannot reach
    the epoch where early stopping may end it before the study's deadline.

    This is what keeps dear candidates (a backbone fine-tuned on a CPU) from eating a budget
    they cannot finish in, while on a GPU the same trials run: the test is their own speed,
    not their kind. The study's first complete trial is never stopped (it must yield a model).
    """

    def __init__(self, deadline: float, needed_epochs: int, may_stop: Callable[[], bool]):
        self.deadline, self.needed, self.may_stop = deadline, needed_epochs, may_stop
        self.started = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        self.started = time.monotonic()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        done = trainer.current_epoch + 1
        if done >= self.needed:
            return
        pace = (time.monotonic() - self.started) / done
        left = self.deadline - time.monotonic()
        if pace * (self.needed - done) > left and self.may_stop():
            raise BudgetPruned(
                f"at {pace:.0f} s per epoch it cannot reach epoch {self.needed} in the "
                f"{max(left, 0):.0f} s the study has left"
            )


class TrialRunner:
    """The objective: one child run per trial, its fit, its ending state."""

    def __init__(
        self,
        base: RunConfig,
        tune: TuneConfig,
        parent_run_id: str,
        data: DataByImageSize,
        deadline: float | None,
        progress: bool,
    ) -> None:
        self.base, self.tune, self.parent_run_id = base, tune, parent_run_id
        self.data, self.deadline, self.progress = data, deadline, progress
        self.method = data.method or "classifier"

    def __call__(self, trial: optuna.Trial) -> float:
        # the run exists before anything can fail: every trial is logged exactly once
        run_id = start_child_run(
            self.parent_run_id,
            run_name=f"{self.tune.study_name}-trial-{trial.number:03d}",
            tags={
                Tag.KIND: Kind.TRIAL,
                Tag.STUDY_NAME: self.tune.study_name,
                Tag.TRIAL_NUMBER: str(trial.number),
                Tag.METHOD: self.method,
                Tag.WORKER: worker_id(),
                **standard_tags(None),
            },
        )
        trial.set_user_attr(TrialAttr.RUN_ID, run_id)
        trial.set_user_attr(TrialAttr.PARENT_RUN_ID, self.parent_run_id)
        trial.set_user_attr(TrialAttr.WORKER, worker_id())
        trial.set_user_attr(TrialAttr.METHOD, self.method)
        # the whole body, post-fit steps included (an artifact store failing during the
        # weights upload): whatever happens, the run ends with the trial's state
        try:
            return self._run(trial, run_id)
        except DeadlinePruned:
            end_pruned(run_id, by="deadline")
            raise
        except BudgetPruned:
            end_pruned(run_id, by="budget")
            raise
        except optuna.TrialPruned:
            end_pruned(run_id, by="pruner")
            raise
        except BaseException as exc:  # KeyboardInterrupt too: never leave a run RUNNING
            interrupted = isinstance(exc, KeyboardInterrupt)
            state = RunTrialState.INTERRUPTED if interrupted else RunTrialState.FAILED
            end_run(
                run_id,
                "KILLED" if interrupted else "FAILED",
                {Tag.TRIAL_STATE: state, Tag.ERROR: f"{type(exc).__name__}: {exc}"[:5000]},
            )
            raise

    def _run(self, trial: optuna.Trial, run_id: str) -> float:
        config, data = self._configure(trial, run_id)
        result = self._fit(trial, config, data, run_id)
        value = result.val_metrics.get(self.tune.metric, float("nan"))
        loss = result.val_metrics.get("val/loss", float("nan"))
        if self._cross_validates(config):
            figures = cross_validated_figures(config, data, self.tune.cv_folds)
            log_metrics({f"cv/{k}": v for k, v in figures.items()}, run_id)
            value = figures[objective_name(self.tune.metric)]
            loss = figures["log_loss"]
        trial.set_user_attr(TrialAttr.VAL_LOSS, loss)
        log_metrics(
            {
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "train_seconds": result.seconds,
            },
            run_id,
        )
        if (
            self.method == "classifier"
            and self._cut_by_deadline(result, config)
            and _has_complete_trial(trial.study)
        ):
            # a fit the deadline cut short says little about its configuration: recorded as
            # pruned, it neither misleads the sampler nor reads as a finished trial in the UI
            raise DeadlinePruned(
                f"the study's deadline stopped it after {result.epochs_run} epochs"
            )
        # only complete trials carry the objective: sorting the runs table by it ranks them
        log_metrics({"objective": value}, run_id)
        save_trial_model(result.net, self._spec(config, data, result.net), run_id)
        end_run(run_id, "FINISHED", {Tag.TRIAL_STATE: RunTrialState.COMPLETE})
        return value

    def _fit(
        self, trial: optuna.Trial, config: RunConfig, data: PreparedData, run_id: str
    ) -> FitResult:
        """A classifier's Lightning fit, pruned and held to the budget per epoch; or a
        detector's bank and threshold (one pass, nothing to prune)."""
        if self.method == "anomaly":
            result, summary = fit_detector(config, data)
            log_metrics(summary.metrics(), run_id)
            return result
        if self._svm_past_deadline(config, data) and _has_complete_trial(trial.study):
            raise BudgetPruned(
                "an svm head's fit cannot stop half-way and would end past the study's deadline"
            )
        pruning = PyTorchLightningPruningCallback(trial, monitor=self.tune.metric)
        callbacks: list[Callback] = [pruning]
        if self.deadline is not None:
            callbacks.append(
                BudgetCheck(
                    self.deadline,
                    config.train.early_stopping_after,
                    lambda: _has_complete_trial(trial.study),
                )
            )
        return fit(config, data, run_id=run_id, callbacks=callbacks, progress=self.progress)

    def _cross_validates(self, config: RunConfig) -> bool:
        """Cross-validation scores cheap trials only (heads on a frozen pretrained encoder's
        cached features), on binary metrics (types are judged on validation)."""
        return (
            self.tune.cv_folds >= 2
            and self.method == "classifier"
            and has_frozen_encoder(config.model)
            and objective_name(self.tune.metric) in METRIC_FUNCTIONS
        )

    def _spec(self, config: RunConfig, data: PreparedData, net: torch.nn.Module) -> ModelSpec:
        if self.method != "anomaly":
            return ModelSpec(config.model, data.preprocess, defect_types=net.defect_types)
        model = replace(config.model, name=detector_backbone(config.model))
        return ModelSpec(model, data.preprocess, method="anomaly", detector=config.detector)

    def _cut_by_deadline(self, result, config: RunConfig) -> bool:
        return (
            self.deadline is not None
            and time.monotonic() >= self.deadline
            and result.epochs_run < config.train.epochs
            and not fitted_by_scikit_learn(config.model)  # fitted whole, whenever it ended
        )

    def _svm_past_deadline(self, config: RunConfig, data: PreparedData) -> bool:
        """Whether an svm head's fit, at its expected pace, would end past the deadline."""
        if self.deadline is None or config.model.head_kind != "svm":
            return False
        if not fitted_by_scikit_learn(config.model):
            return False
        images = int((data.frame["split"] == "train").sum())
        return time.monotonic() + svm_fit_seconds(images) > self.deadline

    def _configure(self, trial: optuna.Trial, run_id: str) -> tuple[RunConfig, PreparedData]:
        config = apply_params(self.base, suggest_params(trial, self.tune.space, self.method))
        config = no_larger_than_the_files(config, self.data.source_size)
        remaining = None if self.deadline is None else max(self.deadline - time.monotonic(), 1)
        # the epoch kept is chosen on the smooth val/loss, as `qi train` does; the objective
        # is then read at that epoch, so it describes the weights the trial keeps
        # early stopping waits for the pruner's verdict (half the epochs): slow starters live
        train = replace(
            config.train,
            epochs=self.tune.epochs,
            early_stopping_after=self.tune.epochs // 2,
            max_seconds=remaining,
        )
        config = replace(config, train=train)
        data = self.data.get(config.data.image_size)
        trial.set_user_attr(TrialAttr.DATA_DIGEST, data.digest)
        set_tags(run_id, {Tag.DATA_DIGEST: data.digest})
        log_config(config, run_id)
        return config, data


def objective_name(metric: str) -> str:
    """The name :func:`~qi.evaluation.metrics.binary_metrics` gives a validation metric."""
    name = metric.split("/", 1)[-1]
    return "log_loss" if name == "loss" else name


def cross_validated_figures(config: RunConfig, data: PreparedData, folds: int) -> dict:
    """Binary figures of the out-of-fold predictions over train+validation at 0.5."""
    labels, probabilities = out_of_fold_probabilities(config, data, folds)
    return binary_metrics(labels, probabilities, 0.5)


def no_larger_than_the_files(config: RunConfig, source_size: int | None) -> RunConfig:
    """A pretrained backbone looks at images at its weights' resolution, but not larger than
    the files themselves (to the next multiple of 32): upscaling adds no detail, only cost
    (EfficientNet-Lite0's features of 128 px castings took a third of the time at 128 px
    than at 224 px)."""
    if config.model.name == "cnn" or not source_size:
        return config
    cap = -(-source_size // 32) * 32
    if config.data.image_size <= cap:
        return config
    return replace(config, data=replace(config.data, image_size=cap))


def end_pruned(run_id: str, by: str) -> None:
    end_run(run_id, "KILLED", {Tag.TRIAL_STATE: RunTrialState.PRUNED, Tag.PRUNED_BY: by})


class FailureBudget:
    """Stop this worker after ``limit`` failed trials: a broken setup must not loop forever."""

    def __init__(self, limit: int) -> None:
        self.limit, self.failed, self.stopped = limit, 0, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.failed >= self.limit:
                log.error(
                    "%d trials failed; stopping the study (see the qi.error tags)", self.failed
                )
                self.stopped = True
                study.stop()


def _has_complete_trial(study: optuna.Study) -> bool:
    """A study without one keeps even a cut-short trial: it still yields a model."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def save_trial_model(net: torch.nn.Module, spec: ModelSpec, run_id: str) -> None:
    """A complete trial's weights and spec, on its own run (``trial_model/``); of a head on a
    frozen pretrained encoder only the head (kilobytes instead of megabytes per trial)."""
    with tempfile.TemporaryDirectory(prefix="qi-trial-") as tmp:
        torch.save(trained_state(net), Path(tmp) / Artifact.TRIAL_WEIGHTS)
        (Path(tmp) / Artifact.TRIAL_SPEC).write_text(spec.to_json())
        log_artifact_folder(run_id, Path(tmp), Artifact.TRIAL_MODEL_DIR)


def load_trial_network(trial: optuna.trial.FrozenTrial):
    """A trial's network and spec, from its child run's artifacts."""
    run_id = trial.user_attrs[TrialAttr.RUN_ID]
    with tempfile.TemporaryDirectory(prefix="qi-best-") as tmp:
        folder = download_run_artifacts(run_id, Artifact.TRIAL_MODEL_DIR, tmp)
        spec = ModelSpec.from_json((folder / Artifact.TRIAL_SPEC).read_text())
        return load_network(spec, folder / Artifact.TRIAL_WEIGHTS), spec
