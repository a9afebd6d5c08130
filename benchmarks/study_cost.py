"""Study cost: wall time, and how soon the study's best model reaches 95% / 99% test accuracy,
with the median pruner and without pruning.

    python benchmarks/study_cost.py              # default budget (8 min per study), two studies
    python benchmarks/study_cost.py --quick      # smoke run (used by the tests)

Both studies search from scratch (no `qi train` configuration enqueued as trial 0), seeded
alike, in temporary stores. After each study, every trial that became the best so far (by its
validation objective, ties by validation loss, as the study picks its best) is scored on the
held-out test split; "time to 95%" is when the study's best-so-far model first reached it,
counted from the start of the command.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
from _common import benchmark_args

from qi.config import (
    DataConfig,
    EvaluationConfig,
    RunConfig,
    SynthConfig,
    TrackingConfig,
    TuneConfig,
)
from qi.data.datamodule import prepare_data
from qi.evaluation.metrics import binary_metrics
from qi.evaluation.scoring import score_split
from qi.study import load_trial_network, trial_rank, tune


def best_so_far_accuracy(study: optuna.Study, base: RunConfig, started: float) -> list[tuple]:
    """(seconds since start, trial number, test accuracy) each time the best trial changed."""
    complete = sorted(
        study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)),
        key=lambda t: t.datetime_complete,
    )
    timeline, best, prepared = [], None, {}
    for trial in complete:
        if best is not None and trial_rank(trial, study.direction) >= trial_rank(
            best, study.direction
        ):
            continue
        best = trial
        net, spec = load_trial_network(trial)
        size = spec.preprocess.image_size
        if size not in prepared:
            prepared[size] = prepare_data(
                replace(base.data, image_size=size), base.synth, progress=False
            )
        labels, scores = score_split(net, prepared[size], "test")
        accuracy = binary_metrics(labels, scores, 0.5)["acc"]
        timeline.append((trial.datetime_complete.timestamp() - started, trial.number, accuracy))
    return timeline


def first_time_at(timeline: list[tuple], level: float) -> str:
    hits = [seconds for seconds, _, accuracy in timeline if accuracy >= level]
    return f"{hits[0]:.0f} s" if hits else "not reached"


def main() -> None:
    args = benchmark_args(
        __doc__,
        quick={"n_trials": 2, "timeout": 0.0},
        timeout=TuneConfig.timeout,
        n_trials=TuneConfig.n_trials,
    )
    synth, space, epochs = SynthConfig(), TuneConfig().space, TuneConfig.epochs
    if args.quick:
        synth = SynthConfig(n_train=80, n_test=30, image_size=32)
        space = replace(space, image_sizes=(32,), widths=(4,), depth=(2, 2), models=("cnn",))
        epochs = 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            os.environ["QI_CACHE_DIR"] = str(Path(tmp) / "cache")
        for pruner in ("median", "none"):
            store = Path(tmp) / pruner
            store.mkdir()
            mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
            mlflow.create_experiment("cost", artifact_location=str(store / "artifacts"))
            base = RunConfig(
                data=DataConfig(),
                synth=synth,
                tracking=TrackingConfig(experiment="cost"),
                evaluation=EvaluationConfig(register=False),
            )
            config = TuneConfig(
                study_name=f"cost-{pruner}",
                pruner=pruner,
                n_trials=args.n_trials,
                timeout=args.timeout,
                epochs=epochs,
                space=space,
                start_with_defaults=False,
            )
            started = time.time()
            outcome = tune(base, config, progress=False)
            wall = time.time() - started
            timeline = best_so_far_accuracy(outcome.study, base, started)
            states = [t.state.name for t in outcome.study.trials]
            quality = outcome.evaluation.metrics_at_half if outcome.evaluation else {}
            rows.append(
                (
                    pruner,
                    wall,
                    states.count("COMPLETE"),
                    states.count("PRUNED"),
                    first_time_at(timeline, 0.95),
                    first_time_at(timeline, 0.99),
                    quality,
                )
            )
    print(
        f"studies from scratch, budget {args.timeout} s / {args.n_trials} trials, "
        f"{epochs} epochs per trial; cpus {os.cpu_count()}"
    )
    print(
        f"{'pruner':<8}{'wall s':>8}{'complete':>10}{'pruned':>8}{'to 95%':>13}{'to 99%':>13}"
        f"{'acc':>7}{'F1':>7}{'recall':>8}"
    )
    for pruner, wall, complete, pruned, t95, t99, q in rows:
        print(
            f"{pruner:<8}{wall:>8.0f}{complete:>10}{pruned:>8}{t95:>13}{t99:>13}"
            f"{q.get('acc', float('nan')):>7.3f}{q.get('f1', float('nan')):>7.3f}"
            f"{q.get('defect_recall', float('nan')):>8.3f}"
        )
    print("acc, F1, recall: the study's best model on the test split at threshold 0.5")


if __name__ == "__main__":
    main()
