"""Scale-out of one study: 1, 2 and 4 `qi tune` workers, two ways of sharing it.

    python benchmarks/scaleout.py                # 1, 2, 4 workers; 12 trials each setup
    python benchmarks/scaleout.py --quick        # smoke run (used by the tests)

Setups:
  journal + sqlite         the default: an Optuna journal file and a sqlite MLflow store
  postgres + server        a throwaway PostgreSQL for the study, and an `mlflow server`
                           (PostgreSQL backend, proxied artifacts) that workers reach over HTTP,
                           with Optuna heartbeats on
Trials are short on purpose (tiny synthetic images, a small CNN, 1 epoch), so the figures
show what sharing costs, not what training costs. Per setup and worker count:
  trials/min      finished trials per minute between the first trial's start and the last
                  trial's end (the study's own clock: worker start-up and the final
                  evaluation are outside it)
  efficiency      trials/min over (1 worker's trials/min x workers)
  trial s         median wall time of a trial's run
  fit s           median time inside Lightning's fit (the `train_seconds` metric)
  overhead s      the difference: MLflow and Optuna calls, configuration, saving the trial
Each worker gets its share of the cores (OMP_NUM_THREADS = cores / workers, at least 1): with
torch's default (every worker takes all cores) two workers on 2 cores ran each fit 9x slower
(measured 2026-11-29), as their OpenMP threads spun against each other.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import mlflow
import optuna
from _common import benchmark_args

from qi.config import SynthConfig
from qi.data import synth
from qi.services import create_database, postgres_binaries, postgres_cluster, tracking_server
from qi.storage import open_storage


def run_workers(
    count: int, data: Path, storage: str, tracking: str, trials: int, folder: Path, name: str
):
    """Start ``count`` workers on one study at once; wait for all; wall seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env["MLFLOW_TRACKING_URI"] = tracking
    # the cores shared out: OpenMP threads that outnumber the cores spin against each other
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    command = [
        sys.executable, "-m", "qi.cli", "tune", "--data-dir", str(data),
        "--n-trials", str(trials), "--epochs", "1", "--image-size", "32",
        "--batch-size", "32", "--models", "cnn", "--pruner", "none", "--timeout", "0",
        "--storage", storage, "--study-name", "scale", "--experiment", name,
        "--no-register", "--no-progress", "--heartbeat-interval", "2", "--grace-period", "10",
    ]  # fmt: skip
    started = time.perf_counter()
    with ExitStack() as stack:
        logs = [stack.enter_context(open(folder / f"worker{i}.log", "w")) for i in range(count)]
        workers = [
            subprocess.Popen(command, env=env, cwd=folder, stdout=log, stderr=log) for log in logs
        ]
        codes = [w.wait(timeout=1800) for w in workers]
    for i, code in enumerate(codes):
        if code:
            tail = (folder / f"worker{i}.log").read_text()[-2000:]
            raise RuntimeError(f"worker {i} of {count} failed ({code}): {tail}")
    return time.perf_counter() - started


def measure(storage: str, tracking: str, name: str) -> dict:
    study = optuna.load_study(study_name="scale", storage=open_storage(storage, tracking))
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    window = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    mlflow.set_tracking_uri(tracking)
    runs = mlflow.search_runs(
        experiment_names=[name], filter_string="tags.`qi.kind` = 'trial'", output_format="list"
    )
    walls = [(r.info.end_time - r.info.start_time) / 1000 for r in runs if r.info.end_time]
    fits = [r.data.metrics["train_seconds"] for r in runs if "train_seconds" in r.data.metrics]
    trial_s, fit_s = statistics.median(walls), statistics.median(fits)
    return {
        "trials": len(finished),
        "per_minute": len(finished) / window.total_seconds() * 60,
        "trial_s": trial_s,
        "fit_s": fit_s,
        "overhead_s": trial_s - fit_s,
    }


def main() -> None:
    args = benchmark_args(__doc__, quick={"workers": "2", "trials": 2}, workers="1,2,4", trials=12)
    counts = [int(c) for c in args.workers.split(",")]
    setups = ["journal + sqlite"]
    if postgres_binaries() is not None:
        setups.append("postgres + server")
    if args.quick:  # the smoke run takes the setup with more parts to break
        setups = setups[-1:]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qi-scaleout-") as tmp:
        root = Path(tmp)
        data = synth.generate(
            root / "data", SynthConfig(n_train=160, n_test=40, image_size=32), progress=False
        )
        with ExitStack() as services:
            server = None
            if "postgres + server" in setups:
                server = services.enter_context(postgres_cluster())
                store = create_database(server, "mlflow")
                tracking = services.enter_context(tracking_server(store, root / "artifacts"))
            for setup in setups:
                for count in counts:
                    folder = root / f"{setup.split()[0]}-{count}"
                    folder.mkdir()
                    if setup == "journal + sqlite":
                        storage, uri = str(folder / "s.journal"), f"sqlite:///{folder / 'm.db'}"
                    else:
                        storage = create_database(server, f"optuna_{count}")
                        uri = tracking
                    name = f"scale-{setup.split()[0]}-{count}"
                    mlflow.set_tracking_uri(uri)
                    mlflow.create_experiment(name)  # made once, before workers race to it
                    wall = run_workers(count, data, storage, uri, args.trials, folder, name)
                    rows.append((setup, count, wall, measure(storage, uri, name)))
    print(
        f"{args.trials} trials per setup (1 epoch, 32 px, small CNN); cpus {os.cpu_count()}; "
        f"setups: {', '.join(setups)}"
    )
    header = (
        f"{'setup':<20}{'workers':>8}{'trials':>7}{'trials/min':>11}{'efficiency':>11}"
        f"{'trial s':>9}{'fit s':>7}{'overhead s':>11}{'wall s':>8}"
    )
    print(header)
    single = {}
    for setup, count, wall, figures in rows:
        single.setdefault(setup, figures["per_minute"] / count)
        efficiency = figures["per_minute"] / (single[setup] * count)
        print(
            f"{setup:<20}{count:>8}{figures['trials']:>7}{figures['per_minute']:>11.1f}"
            f"{efficiency:>11.0%}{figures['trial_s']:>9.2f}{figures['fit_s']:>7.2f}"
            f"{figures['overhead_s']:>11.2f}{wall:>8.0f}"
        )


if __name__ == "__main__":
    main()
