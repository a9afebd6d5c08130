"""``qi tune``: an Optuna study whose trials are nested MLflow runs of Lightning fits.

Each invocation is one *worker*: it opens (or, under ``mlflow run``, reuses) a parent run,
loads or creates the study in its storage, and runs trials until the study has
``n_trials`` finished (complete or pruned) trials or its timeout passes. Several workers -
processes on one machine sharing the journal file, or machines sharing a database and an
MLflow server - can run one study at once; each trial is logged once, as a child run of the
worker that ran it.

The best trial's model is *kept from its trial*, not retrained on train+val: the trial's
early stopping chose its epoch on the validation split, and a retrain would have no such signal
(and would cost another full fit). Its weights travel as an artifact of its child run, so the
best trial may come from any worker or an earlier session.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import optuna
import torch
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from qi.config import RunConfig, TuneConfig, to_dict
from qi.data.datamodule import PreparedData, check_data_dir, prepare_data
from qi.evaluation import Evaluation, evaluate
from qi.evaluation_report import log_evaluation
from qi.registry import (
    PromotionDecision,
    promote,
    register,
    registry_lock,
    version_of_trial_run,
)
from qi.serving import ModelSpec, load_network, log_inspection_model
from qi.study_report import log_study_report
from qi.study_setup import (
    apply_params,
    build_pruner,
    build_sampler,
    default_params,
    describe,
    open_storage,
    storage_label,
    suggest_params,
)
from qi.tracking import (
    configure_tracking,
    log_config,
    log_metrics,
    log_run_config,
    standard_tags,
    training_run,
)
from qi.train import log_prepared_data
from qi.training import fit, metric_mode, validate_metric

log = logging.getLogger(__name__)

FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
MODEL_DIR = "trial_model"


@dataclass
class TuneOutcome:
    parent_run_id: str
    study: optuna.Study | None
    best_trial: optuna.trial.FrozenTrial | None
    evaluation: Evaluation | None
    model_uri: str | None
    registered_version: str | None = None
    decision: PromotionDecision | None = None


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class DataByImageSize:
    """Prepared data per image size, shared by every trial of this worker."""

    def __init__(self, base: RunConfig, progress: bool) -> None:
        self.base, self.progress = base, progress
        self._prepared: dict[int, PreparedData] = {}

    def get(self, image_size: int) -> PreparedData:
        if image_size not in self._prepared:
            config = replace(self.base.data, image_size=image_size)
            self._prepared[image_size] = prepare_data(config, self.base.synth, self.progress)
        return self._prepared[image_size]


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
        self.client = mlflow.MlflowClient()
        self.experiment_id = self.client.get_run(parent_run_id).info.experiment_id

    def __call__(self, trial: optuna.Trial) -> float:
        # the run exists before anything can fail: every trial is logged exactly once
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{self.tune.study_name}-trial-{trial.number:03d}",
            tags={
                "mlflow.parentRunId": self.parent_run_id,
                "qi.kind": "trial",
                "qi.study_name": self.tune.study_name,
                "qi.trial_number": str(trial.number),
                "qi.worker": worker_id(),
                **standard_tags(None),
            },
        )
        run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("mlflow_parent_run_id", self.parent_run_id)
        trial.set_user_attr("worker", worker_id())
        try:
            config, data = self._configure(trial, run_id)
            pruning = PyTorchLightningPruningCallback(trial, monitor=self.tune.metric)
            result = fit(
                config,
                data,
                run_id=run_id,
                callbacks=[pruning],
                progress=self.progress,
            )
        except optuna.TrialPruned:
            self._end_pruned(run_id, by="pruner")
            raise
        except BaseException as exc:  # KeyboardInterrupt too: never leave a run RUNNING
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.client.set_tag(
                run_id, "qi.trial_state", "interrupted" if interrupted else "failed"
            )
            self.client.set_tag(run_id, "qi.error", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(run_id, "KILLED" if interrupted else "FAILED")
            raise
        value = result.val_metrics.get(self.tune.metric, float("nan"))
        trial.set_user_attr("val_loss", result.val_metrics.get("val/loss", float("nan")))
        log_metrics(
            {
                "objective": value,
                "best_epoch": result.best_epoch,
                "epochs_run": result.epochs_run,
                "train_seconds": result.seconds,
            },
            run_id,
        )
        if self._cut_by_deadline(result, config) and _has_complete_trial(trial.study):
            # a fit the deadline cut short says little about its configuration: recorded as
            # pruned, it neither misleads the sampler nor reads as a finished trial in the UI
            self._end_pruned(run_id, by="deadline")
            raise optuna.TrialPruned(
                f"the study's deadline stopped it after {result.epochs_run} epochs"
            )
        self._save_weights(result.net, config, data, run_id)
        self.client.set_tag(run_id, "qi.trial_state", "complete")
        self.client.set_terminated(run_id, "FINISHED")
        return value

    def _end_pruned(self, run_id: str, by: str) -> None:
        self.client.set_tag(run_id, "qi.trial_state", "pruned")
        self.client.set_tag(run_id, "qi.pruned_by", by)
        self.client.set_terminated(run_id, "KILLED")

    def _cut_by_deadline(self, result, config: RunConfig) -> bool:
        return (
            self.deadline is not None
            and time.monotonic() >= self.deadline
            and result.epochs_run < config.train.epochs
        )

    def _configure(self, trial: optuna.Trial, run_id: str) -> tuple[RunConfig, PreparedData]:
        config = apply_params(self.base, suggest_params(trial, self.tune.space))
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
        trial.set_user_attr("data_digest", data.digest)
        self.client.set_tag(run_id, "qi.data_digest", data.digest)
        log_config(config, run_id)
        return config, data

    def _save_weights(self, net, config: RunConfig, data: PreparedData, run_id: str) -> None:
        spec = ModelSpec(model=config.model, preprocess=data.preprocess)
        with tempfile.TemporaryDirectory(prefix="qi-trial-") as tmp:
            torch.save(net.state_dict(), Path(tmp) / WEIGHTS_FILE)
            (Path(tmp) / SPEC_FILE).write_text(spec.to_json())
            self.client.log_artifacts(run_id, tmp, MODEL_DIR)


class FailureBudget:
    """Stop this worker after ``limit`` failed trials: a broken setup must not loop forever."""

    def __init__(self, limit: int) -> None:
        self.limit, self.failed = limit, 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == TrialState.FAIL:
            self.failed += 1
            if self.failed >= self.limit:
                log.error(
                    "%d trials failed; stopping the study (see the qi.error tags)", self.failed
                )
                study.stop()


def _has_complete_trial(study: optuna.Study) -> bool:
    """A study without one keeps even a cut-short trial: it still yields a model."""
    return bool(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def fail_stale_local_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead workers on this host FAILED, in Optuna and in MLflow.

    A killed worker (SIGKILL, power loss) cannot mark its own trial; the next worker does.
    """
    host = socket.gethostname()
    client = mlflow.MlflowClient()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            client.set_tag(run_id, "qi.trial_state", "failed")
            client.set_tag(run_id, "qi.error", f"worker {worker} died during the trial")
            client.set_terminated(run_id, "FAILED")
        parent_id = trial.user_attrs.get("mlflow_parent_run_id")
        if parent_id and client.get_run(parent_id).info.status == "RUNNING":
            client.set_tag(parent_id, "qi.error", f"worker {worker} died")
            client.set_terminated(parent_id, "KILLED")
        failed += 1
    return failed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_trial_network(trial: optuna.trial.FrozenTrial):
    """The best trial's network and spec, from its child run's artifacts."""
    run_id = trial.user_attrs["mlflow_run_id"]
    with tempfile.TemporaryDirectory(prefix="qi-best-") as tmp:
        folder = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=MODEL_DIR, dst_path=tmp
            )
        )
        spec = ModelSpec.from_json((folder / SPEC_FILE).read_text())
        return load_network(spec, folder / WEIGHTS_FILE), spec


def tune(
    base: RunConfig,
    config: TuneConfig,
    progress: bool = True,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneOutcome:
    """Run (or continue) the study, then evaluate and log the best trial's model.

    ``pruner`` replaces the one named in ``config`` (library users with their own rule).
    """
    validate_metric(config.metric)
    check_data_dir(base.data)
    tracking_uri = configure_tracking(base.tracking)
    storage = open_storage(config.storage, tracking_uri)
    study = optuna.create_study(
        storage=storage,
        study_name=config.study_name,
        load_if_exists=True,
        direction="minimize" if metric_mode(config.metric) == "min" else "maximize",
        sampler=build_sampler(config.sampler, config.seed),
        pruner=pruner or build_pruner(config.pruner, config.epochs),
    )
    existing = len(study.trials)
    stale = fail_stale_local_trials(study)
    data = DataByImageSize(base, progress)
    first = data.get(base.data.image_size)  # fail fast on bad data, before any trial
    tags = standard_tags(
        first.digest,
        {
            "qi.kind": "tune",
            "qi.study_name": config.study_name,
            "qi.storage": storage_label(config.storage, tracking_uri),
            "qi.continues_study": str(existing > 0).lower(),
            "qi.worker": worker_id(),
            "qi.data_layout": first.layout,
            "qi.data_root": str(first.root),
        },
    )
    with training_run(base.tracking, tags=tags) as parent_run_id:
        mlflow.set_tags(tags)
        if base.tracking.run_name is None and "MLFLOW_RUN_ID" not in os.environ:
            mlflow.set_tag("mlflow.runName", f"{config.study_name}-study")
        log_run_config({"base": to_dict(base), "tune": to_dict(config)}, parent_run_id)
        mlflow.log_params({k: str(v)[:6000] for k, v in describe(config).items()})
        log_config(base.data, parent_run_id, prefix="data.")  # trials' own params are on them
        log_metrics({"trials_before": existing, "stale_trials_failed": stale}, parent_run_id)
        log_prepared_data(first, parent_run_id)
        if existing == 0 and config.start_with_defaults:
            defaults = default_params(base, config.space)
            if defaults:
                study.enqueue_trial(defaults, skip_if_exists=True)
        if existing == 0:
            for params in config.enqueue:  # as the user listed them, repeats included
                study.enqueue_trial(params)
        deadline = None if config.timeout is None else time.monotonic() + config.timeout
        runner = TrialRunner(base, config, parent_run_id, data, deadline, progress)
        if finished_trials(study) < config.n_trials:
            study.optimize(
                runner,
                timeout=config.timeout,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(config.n_trials, states=FINISHED_STATES),
                    FailureBudget(max(3, config.n_trials)),
                ],
            )
        mine = [
            t for t in study.trials if t.user_attrs.get("mlflow_parent_run_id") == parent_run_id
        ]
        counts = {s.name.lower(): sum(t.state == s for t in mine) for s in TrialState}
        log_metrics(
            {f"trials_{k}": v for k, v in counts.items() if v}
            | {"trials_total": len(study.trials)},
            parent_run_id,
        )
        log_study_report(study, parent_run_id)
        best = best_trial(study)
        if best is None:
            log.warning("study %s has no completed trial yet", config.study_name)
            return TuneOutcome(parent_run_id, study, None, None, None)
        outcome = _finish_best(best, data, base, config, parent_run_id)
    outcome.study = study
    return outcome


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best complete trial; ties on the objective go to the lower validation loss.

    F1 or accuracy on a few hundred validation images moves in steps of ~0.005 and reaches
    1.0 once a model separates them, so several trials often tie; Optuna would keep the
    first. The loss still ranks them by how far they keep the two classes apart.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    return min(complete, key=lambda t: trial_rank(t, study.direction))


def trial_rank(trial: optuna.trial.FrozenTrial, direction: optuna.study.StudyDirection) -> tuple:
    """Sort key of complete trials, best first: objective, then validation loss, then age."""
    loss = trial.user_attrs.get("val_loss")
    loss = math.inf if loss is None or math.isnan(loss) else loss
    objective = -trial.value if direction == optuna.study.StudyDirection.MAXIMIZE else trial.value
    return (objective, loss, trial.number)


def _finish_best(
    best, data: DataByImageSize, base: RunConfig, config: TuneConfig, parent_run_id: str
) -> TuneOutcome:
    """Best value and params on the parent; the best model evaluated, logged, registered."""
    mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
    mlflow.set_tags(
        {
            "qi.best_trial": str(best.number),
            "qi.best_run_id": best.user_attrs.get("mlflow_run_id", ""),
        }
    )
    log_metrics({"best_value": best.value, "best_trial": best.number}, parent_run_id)
    net, spec = load_trial_network(best)
    prepared = data.get(spec.preprocess.image_size)
    if best.user_attrs.get("data_digest") not in (None, prepared.digest):
        log.warning(
            "the best trial was trained on other data (digest %s, now %s)",
            best.user_attrs.get("data_digest"),
            prepared.digest,
        )
    settings = base.evaluation
    evaluation = evaluate(net, prepared, settings.target_recall)
    log_evaluation(
        evaluation, parent_run_id, title=f"Study {config.study_name}: best trial {best.number}"
    )
    spec = replace(spec, threshold=evaluation.threshold)
    info = log_inspection_model(net, spec, example_image=prepared.images[0])
    outcome = TuneOutcome(parent_run_id, None, best, evaluation, info.model_uri)
    if settings.register:
        # one lock per model name: workers finishing together register the best trial once
        with registry_lock(config.model_name):
            _register_best(outcome, prepared, config, settings)
    log.info(
        "best trial %d: %s=%.4f, test accuracy %.4f at threshold %.3f",
        best.number,
        config.metric,
        best.value,
        evaluation.metrics["acc"],
        evaluation.threshold,
    )
    return outcome


def _register_best(
    outcome: TuneOutcome, prepared: PreparedData, config: TuneConfig, settings
) -> None:
    best, evaluation = outcome.best_trial, outcome.evaluation
    best_run_id = best.user_attrs.get("mlflow_run_id", "")
    existing = version_of_trial_run(config.model_name, best_run_id)
    if existing is not None:
        outcome.registered_version = str(existing.version)
        mlflow.set_tags(
            {
                "qi.registered_model": config.model_name,
                "qi.registered_version": outcome.registered_version,
                "qi.promotion": "skipped",
                "qi.promotion_reason": f"trial {best.number} is already version {existing.version}",
            }
        )
        return
    version = register(
        outcome.model_uri,
        config.model_name,
        description=model_description(evaluation, config, best),
        tags={
            "qi.study_name": config.study_name,
            "qi.parent_run_id": outcome.parent_run_id,
            "qi.best_trial": str(best.number),
            "qi.best_run_id": best_run_id,
            "qi.data_digest": prepared.digest,
            "qi.data_root": str(prepared.root),
            "qi.threshold": f"{evaluation.threshold:.6f}",
        },
    )
    decision = promote(
        config.model_name,
        str(version.version),
        prepared.split_frame("test"),
        settings.promotion_metric,
        settings.force_promote,
    )
    mlflow.set_tags(
        {
            "qi.registered_model": config.model_name,
            "qi.registered_version": str(version.version),
            "qi.promotion": decision.alias,
            "qi.promotion_reason": decision.reason,
        }
    )
    outcome.registered_version, outcome.decision = str(version.version), decision


def model_description(evaluation: Evaluation, config: TuneConfig, best) -> str:
    m = evaluation.metrics
    return (
        f"Best trial {best.number} of Optuna study '{config.study_name}' ({config.metric} "
        f"{best.value:.4f}). Test: accuracy {m['acc']:.4f}, F1 {m['f1']:.4f}, defect recall "
        f"{m['defect_recall']:.4f}, ROC AUC {m['auroc']:.4f} at threshold "
        f"{evaluation.threshold:.4f} (chosen on validation for defect recall >= "
        f"{evaluation.target_recall}). Input: DataFrame column 'image' of encoded image bytes; "
        "output: label, defect_probability, threshold."
    )


__all__ = ["TuneOutcome", "best_trial", "trial_rank", "tune"]
