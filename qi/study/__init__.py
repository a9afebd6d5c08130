"""``qi tune``: an Optuna study whose trials are nested MLflow runs of Lightning fits.

Each call of :func:`tune` is one *worker*: it opens (or, under ``mlflow run``, reuses) a
parent run, loads or creates the study in its storage, and runs trials until the study has
``n_trials`` finished (complete or pruned) trials or its timeout passes. Several workers -
processes on one machine sharing the journal file, or machines sharing a database and an
MLflow server - can run one study at once; each trial is logged once, as a child run of the
worker that ran it.

The parts: :mod:`~qi.study.worker` (one worker's loop: :func:`tune`),
:mod:`~qi.study.space` (the search space), :mod:`~qi.study.sampling` (samplers, pruners),
:mod:`~qi.study.trials` (the trial runner), :mod:`~qi.study.recovery` (dead workers),
:mod:`~qi.study.best` (the best trial, evaluated and registered), :mod:`~qi.study.report`
(trial table and plots on the parent run). The storage is :mod:`qi.storage`.
"""

from qi.study.best import TuneOutcome, best_trial, trial_rank
from qi.study.trials import load_trial_network
from qi.study.worker import tune

__all__ = ["TuneOutcome", "best_trial", "load_trial_network", "trial_rank", "tune"]
