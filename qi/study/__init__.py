"""``qi tune``: an Optuna study whose trials are nested MLflow runs of Lightning fits.

Each call of :func:`tune` is one *worker*: it opens (or, under ``mlflow run``, reuses) a
parent run, loads or creates the study in its storage, and runs trials until the study has
``n_trials`` finished (complete or pruned) trials or its timeout passes. Several workers -
processes on one machine sharing the journal file, or machines sharing a database and an
MLflow server - can run one study at once; each trial is logged once, as a child run of the
worker that ran it.

The parts: :mod:`~qi.study.setup` (storage, sampler, pruner, search space),
:mod:`~qi.study.trials` (the trial runner), :mod:`~qi.study.recovery` (dead workers),
:mod:`~qi.study.best` (the best trial, evaluated and registered), :mod:`~qi.study.report`
(trial table and plots on the parent run).
"""

from __future__ import annotations

import logging
import time

import mlflow
import optuna
from optuna.trial import TrialState

from qi.config import RunConfig, TuneConfig, to_dict
from qi.data.datamodule import check_data_dir
from qi.fit import metric_mode, validate_metric
from qi.study.best import TuneOutcome, best_trial, finish_best, trial_rank
from qi.study.recovery import fail_stale_local_trials
from qi.study.report import log_study_report
from qi.study.setup import (
    build_pruner,
    build_sampler,
    describe,
    open_storage,
    resolve_study,
    starting_trials,
    storage_label,
)
from qi.study.trials import (
    FINISHED_STATES,
    DataByImageSize,
    FailureBudget,
    TrialRunner,
    finished_trials,
    load_trial_network,
    worker_id,
)
from qi.tags import Kind, Tag, TrialAttr
from qi.tracking import (
    configure_tracking,
    generated_run_name,
    log_config,
    log_metrics,
    log_run_config,
    standard_tags,
    training_run,
)
from qi.train import log_prepared_data

log = logging.getLogger(__name__)


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
    storage = open_storage(config.storage, tracking_uri)
    study = optuna.create_study(
        storage=storage,
        study_name=config.study_name,
        load_if_exists=True,
        direction="minimize" if metric_mode(config.metric) == "min" else "maximize",
        sampler=build_sampler(config.sampler, config.seed, config.epochs),
        pruner=pruner or build_pruner(config.pruner, config.epochs),
    )
    existing = len(study.trials)
    stale = fail_stale_local_trials(study)
    data = DataByImageSize(base, progress)
    first = data.get(base.data.image_size)  # fail fast on bad data, before any trial
    tags = standard_tags(
        first.digest,
        {
            Tag.KIND: Kind.TUNE,
            Tag.STUDY_NAME: config.study_name,
            Tag.STORAGE: storage_label(config.storage, tracking_uri),
            Tag.CONTINUES_STUDY: str(existing > 0).lower(),
            Tag.WORKER: worker_id(),
            Tag.DATA_LAYOUT: first.layout,
            Tag.DATA_ROOT: str(first.root),
        },
    )
    with training_run(base.tracking, tags=tags) as parent_run_id:
        mlflow.set_tags(tags)
        # named after the study, also under `mlflow run` (whose names are made up)
        name = mlflow.get_run(parent_run_id).info.run_name
        if base.tracking.run_name is None and generated_run_name(name):
            mlflow.set_tag(Tag.RUN_NAME, f"{config.study_name}-study")
        log_run_config({"base": to_dict(base), "tune": to_dict(config)}, parent_run_id)
        mlflow.log_params({k: str(v)[:6000] for k, v in describe(config).items()})
        log_config(base.data, parent_run_id, prefix="data.")  # trials' own params are on them
        log_metrics({"trials_before": existing, "stale_trials_failed": stale}, parent_run_id)
        log_prepared_data(first, parent_run_id)
        if existing == 0 and config.start_with_defaults:
            for params in starting_trials(base, config.space):
                study.enqueue_trial(params, skip_if_exists=True)
        if existing == 0:
            for params in config.enqueue:  # as the user listed them, repeats included
                study.enqueue_trial(params)
        budget = config.deadline_seconds
        deadline = None if budget is None else time.monotonic() + budget
        runner = TrialRunner(base, config, parent_run_id, data, deadline, progress)
        if finished_trials(study) < config.n_trials:
            study.optimize(
                runner,
                timeout=budget,
                catch=(Exception,),
                callbacks=[
                    optuna.study.MaxTrialsCallback(config.n_trials, states=FINISHED_STATES),
                    FailureBudget(max(3, config.n_trials)),
                ],
            )
        mine = [
            t for t in study.trials if t.user_attrs.get(TrialAttr.PARENT_RUN_ID) == parent_run_id
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
        outcome = finish_best(best, data, base, config, parent_run_id)
    outcome.study = study
    return outcome


__all__ = ["TuneOutcome", "best_trial", "load_trial_network", "trial_rank", "tune"]
