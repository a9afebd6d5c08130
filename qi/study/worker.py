"""One worker of a study: :func:`tune` opens the storage and the parent run, runs trials until
the study has enough, waits for the other workers' trials, then finishes the best one."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import mlflow
import optuna
from optuna.trial import TrialState

from qi.anomaly.fitting import MIN_VALIDATION_DEFECTS, NoDefectsToJudge, validation_defects
from qi.anomaly.method import choose_method
from qi.choices import TYPE_METRICS, metric_mode, validate_metric
from qi.config import RunConfig, TuneConfig, to_dict
from qi.data.datamodule import PreparedData, check_data_dir
from qi.data.discovery import DataLayoutError
from qi.data.types import MIN_TYPE_IMAGES, MIN_TYPES, types_warning
from qi.fit.fitting import defect_types_to_learn
from qi.interrupts import checkpoint
from qi.locks import check_lockable
from qi.storage import (
    Heartbeat,
    StorageError,
    open_storage,
    public_label,
    redacted,
    storage_label,
)
from qi.study.best import TuneOutcome, best_trial, finish_best
from qi.study.recovery import (
    StaleTrialCleanup,
    WorkerBeat,
    close_dead_workers,
    fail_stale_trials,
    worker_id,
)
from qi.study.report import log_study_report
from qi.study.sampling import build_pruner, build_sampler
from qi.study.space import describe, resolve_study, starting_trials
from qi.study.trials import (
    FINISHED_STATES,
    DataByImageSize,
    FailureBudget,
    TrialRunner,
    finished_trials,
)
from qi.tags import Kind, Tag, TrialAttr
from qi.tracking import (
    configure_tracking,
    generated_run_name,
    log_config,
    log_metrics,
    log_prepared_data,
    log_run_config,
    standard_tags,
    training_run,
)

log = logging.getLogger(__name__)

METRIC_ATTR = "qi.metric"  # study user attribute: the metric the study was created for
METHOD_ATTR = "qi.method"  # and the method its trials use ("classifier" before it existed)


def tune(
    base: RunConfig,
    config: TuneConfig,
    progress: bool = True,
    pruner: optuna.pruners.BasePruner | None = None,
) -> TuneOutcome:
    """Run (or continue) the study, then evaluate and log the best trial's model.

    ``pruner`` replaces the one named in ``config`` (library users with their own rule).
    """
    base, config = resolve_study(base, config)
    validate_metric(config.metric)
    check_data_dir(base.data)
    tracking_uri = configure_tracking(base.tracking)
    heartbeat = Heartbeat(
        config.heartbeat_interval, config.grace_period, on_stale_trial=StaleTrialCleanup()
    )
    if base.evaluation.register:  # refused before any training, not after the study
        check_lockable(storage_label(config.storage, tracking_uri))
    storage = open_storage(config.storage, tracking_uri, heartbeat)
    study = load_or_create_study(storage, config, pruner)
    check_study_runs(study, config.study_name, public_label(config.storage, tracking_uri))
    existing = len(study.trials)
    stale = fail_stale_trials(study)
    close_dead_workers(study, config.grace_period)
    data = DataByImageSize(base, progress)
    first = data.get(base.data.image_size)  # fail fast on bad data, before any trial
    method, why = choose_method(base.detector.method, first.frame, first.layout)
    log.info("method: %s (%s)", method, why)
    data.use_method(method)
    first = data.get(base.data.image_size)
    if method == "anomaly":
        check_detector_study(first, config)
    types = defect_types_to_learn(base, first) if method == "classifier" else ()
    check_type_metric(config.metric, method, types, first)
    if method == "classifier" and base.model.defect_types != "off":
        warning = types_warning(first.frame, types)
        if warning:
            log.warning("%s", warning)
    check_study_method(study, method, config.study_name)
    tags = standard_tags(
        first.digest,
        {
            Tag.KIND: Kind.TUNE,
            Tag.STUDY_NAME: config.study_name,
            Tag.STORAGE: public_label(config.storage, tracking_uri),
            Tag.CONTINUES_STUDY: str(existing > 0).lower(),
            Tag.WORKER: worker_id(),
            Tag.DATA_LAYOUT: first.layout,
            Tag.DATA_ROOT: str(first.root),
            Tag.METHOD: method,
            Tag.METHOD_REASON: why,
        },
    )
    with (
        training_run(base.tracking, tags=tags) as parent_run_id,
        WorkerBeat(study, parent_run_id, config.heartbeat_interval),
    ):
        mlflow.set_tags(tags)
        # named after the study, also under `mlflow run` (whose names are made up)
        name = mlflow.get_run(parent_run_id).info.run_name
        if base.tracking.run_name is None and generated_run_name(name):
            mlflow.set_tag(Tag.RUN_NAME, f"{config.study_name}-study")
        public = replace(config, storage=redacted(config.storage))  # no password in artifacts
        log_run_config({"base": to_dict(base), "tune": to_dict(public)}, parent_run_id)
        mlflow.log_params({k: str(v)[:6000] for k, v in describe(config).items()})
        log_config(base.data, parent_run_id, prefix="data.")  # trials' own params are on them
        log_metrics({"trials_before": existing, "stale_trials_failed": stale}, parent_run_id)
        log_prepared_data(first, parent_run_id)
        if existing == 0 and config.start_with_defaults:
            for params in starting_trials(base, config.space, method):
                study.enqueue_trial(params, skip_if_exists=True)
        if existing == 0:
            for params in config.enqueue:  # as the user listed them, repeats included
                study.enqueue_trial(params)
        budget = config.deadline_seconds
        deadline = None if budget is None else time.monotonic() + budget
        runner = TrialRunner(base, config, parent_run_id, data, deadline, progress)
        heartbeats = isinstance(storage, optuna.storages.RDBStorage)
        run_until_settled(study, runner, config, deadline, heartbeats)
        trials = study.trials
        mine = [t for t in trials if t.user_attrs.get(TrialAttr.PARENT_RUN_ID) == parent_run_id]
        counts = {s.name.lower(): sum(t.state == s for t in mine) for s in TrialState}
        totals = {f"trials_{k}": v for k, v in counts.items() if v}
        log_metrics(totals | {"trials_total": len(trials)}, parent_run_id)
        log_study_report(study, parent_run_id)
        close_dead_workers(study, config.grace_period)
        best = best_trial(study)
        if best is None:
            log.warning("study %s has no completed trial yet", config.study_name)
            return TuneOutcome(parent_run_id, study, None, None, None, method=method)
        outcome = finish_best(best, data, base, config, parent_run_id, study)
        outcome.study, outcome.method, outcome.method_reason = study, method, why
        return outcome


def check_detector_study(data: PreparedData, config: TuneConfig) -> None:
    """A study ranks detector settings on defective validation images: without enough of
    them every trial would score the same nothing. One line, before any trial."""
    defects = validation_defects(data)
    if defects < MIN_VALIDATION_DEFECTS:
        raise NoDefectsToJudge(
            f"qi tune --method anomaly ranks detector settings by {config.metric} on defective "
            f"validation images; {data.root} has {defects} (needs {MIN_VALIDATION_DEFECTS}): "
            "add labelled defects, or fit one detector with qi train --method anomaly"
        )


def check_type_metric(metric: str, method: str, types: tuple[str, ...], data: PreparedData) -> None:
    """A type metric ranks trials by how well they name defect types: a study whose models
    learn none would rank them all by nothing. One line, before any trial."""
    if metric.rsplit("/", 1)[-1] not in TYPE_METRICS:
        return
    if method == "anomaly":
        raise DataLayoutError(
            f"--metric {metric}: a detector trained on good images learns no defect types; "
            "use the default --metric, or --method classifier with labelled defect types"
        )
    if not types:
        raise DataLayoutError(
            f"--metric {metric}: the models of this study learn no defect types ({data.root} "
            f"names fewer than {MIN_TYPES} types with {MIN_TYPE_IMAGES}+ training images each, "
            "or --defect-types off): use the default --metric"
        )


def check_study_method(study: optuna.Study, method: str, name: str) -> None:
    """A study's trials are all classifiers or all detectors: their objectives are measured
    on different validation splits (a detector's holds the training defects too)."""
    recorded = study.user_attrs.get(METHOD_ATTR)
    if recorded is None:
        if not study.trials or method == "classifier":
            study.set_user_attr(METHOD_ATTR, method)
        else:
            raise StorageError(
                f"study '{name}' holds classifier trials; this data chose {method}: pass "
                "--method classifier, or another --study-name"
            )
    elif recorded != method:
        raise StorageError(
            f"study '{name}' holds {recorded} trials; this run chose {method}: pass "
            f"--method {recorded}, or another --study-name"
        )


def load_or_create_study(
    storage: optuna.storages.BaseStorage,
    config: TuneConfig,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """The study of ``config``, created on first use; a study that exists with another
    direction or metric is a :class:`StorageError`, before any training."""
    direction = "minimize" if metric_mode(config.metric) == "min" else "maximize"
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=config.study_name,
            load_if_exists=True,
            direction=direction,
            sampler=build_sampler(config.sampler, config.seed),
            pruner=pruner or build_pruner(config.pruner, config.epochs),
        )
    except ValueError as exc:
        raise StorageError(f"study '{config.study_name}': {exc}") from None
    recorded = study.user_attrs.get(METRIC_ATTR)
    if recorded is None and not study.trials:
        study.set_user_attr(METRIC_ATTR, config.metric)
    elif recorded is not None and recorded != config.metric:
        raise StorageError(
            f"study '{config.study_name}' optimises {recorded}, not {config.metric}: pass "
            f"--metric {recorded}, or another --study-name for a new study"
        )
    if study.direction.name.lower() != direction:
        raise StorageError(
            f"study '{config.study_name}' was created to {study.direction.name.lower()}, "
            f"but {config.metric} must {direction}: use another --study-name"
        )
    return study


def check_study_runs(study: optuna.Study, name: str, storage_label: str) -> None:
    """A study's finished trials live as runs in one tracking store; against another (a new
    MLFLOW_TRACKING_URI, the study file reused) its best model could not be read back after
    the new trials. One line, before any trial; other tracking errors are raised as they are."""
    from mlflow.exceptions import MlflowException

    finished = [
        t
        for t in study.trials
        if t.state == TrialState.COMPLETE and TrialAttr.RUN_ID in t.user_attrs
    ]
    if not finished:
        return
    trial = finished[-1]
    run_id = trial.user_attrs[TrialAttr.RUN_ID]
    try:
        mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise StorageError(
            f"study '{name}' in {storage_label} has trials whose MLflow runs are not in the "
            f"tracking store {mlflow.get_tracking_uri()} (trial {trial.number}: run {run_id}): "
            "use the tracking store the study ran with, or another --study-name"
        ) from None


def run_until_settled(
    study: optuna.Study,
    runner: TrialRunner,
    config: TuneConfig,
    deadline: float | None,
    heartbeats: bool,
) -> None:
    """Run trials until the study has ``n_trials`` finished ones (or the deadline), then wait
    for the trials other workers are still running, so that every worker picks the same best
    trial from the same finished study. A trial of a dead worker does not hold the wait: it
    goes stale and fails (and is queued again, then run here) - after ``grace_period`` with
    ``heartbeats`` (database storages), at once on this host. A journal file shared across
    hosts has neither: the wait for others' trials there ends after ``grace_period`` without
    news."""
    failures = FailureBudget(max(3, config.n_trials))
    poll = min(float(config.heartbeat_interval), 2.0)
    quiet_since, last_seen = time.monotonic(), None
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if _wanted(study, config, left, failures):
            study.optimize(
                runner,
                timeout=left,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(config.n_trials, states=FINISHED_STATES),
                    failures,
                    lambda study, trial: checkpoint("between_trials"),
                ],
            )
        fail_stale_trials(study)
        left = None if deadline is None else deadline - time.monotonic()
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)) and _wanted(
            study, config, left, failures
        ):
            continue  # a trial of a dead worker was queued again: run it
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if not running:
            return
        if running != last_seen:
            quiet_since, last_seen = time.monotonic(), running
            log.info("waiting for trials %s of other workers to finish", sorted(running))
        elif not heartbeats and time.monotonic() - quiet_since > config.grace_period:
            log.warning("trials %s still RUNNING with no news: not waiting", sorted(running))
            return
        time.sleep(poll)


def _wanted(
    study: optuna.Study, config: TuneConfig, left: float | None, failures: FailureBudget
) -> bool:
    """Whether this worker should start trials: the study lacks finished ones, time is left
    and this worker's setup is not broken."""
    return (
        finished_trials(study) < config.n_trials
        and (left is None or left > 0)
        and not failures.stopped
    )


__all__ = ["load_or_create_study", "run_until_settled", "tune"]
