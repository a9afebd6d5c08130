"""``qi study status``: what an operator looks at first, for a study in any storage.

The trials by state, every worker seen (its last heartbeat, whether it is alive, its parent
run and its trials), the best trial so far with its MLflow run, and the running trials. It
reads only: a dead worker's runs are closed by the next worker (see
:mod:`qi.study.recovery`); here it is reported as dead.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from optuna.trial import TrialState

from qi.storage import StorageError, open_storage, public_label
from qi.study.recovery import RUNNING, is_dead, worker_records
from qi.tags import TrialAttr


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def _run_status(run_id: str | None) -> str | None:
    if not run_id:
        return None
    try:
        return mlflow.MlflowClient().get_run(run_id).info.status
    except MlflowException:
        return "unknown"


def study_status(
    storage: str | None, study_name: str, tracking_uri: str, grace_period: float
) -> dict:
    """The study's state as plain data (what ``--json`` prints)."""
    label = public_label(storage, tracking_uri)
    opened = open_storage(storage, tracking_uri)
    try:
        study = optuna.load_study(study_name=study_name, storage=opened)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(opened)]
        raise StorageError(
            f"no study '{study_name}' in {label}; studies there: {names or 'none'}"
        ) from None
    trials = study.get_trials(deepcopy=False)
    now = time.time()
    workers: dict[str, dict] = {}
    for worker, record in worker_records(study).items():
        beat = float(record.get("beat", 0))
        state = record.get("state")
        if state == RUNNING and is_dead(record, worker, grace_period, now):
            state = "dead"
        workers[worker] = {
            "state": state,
            "last_heartbeat": _iso(beat),
            "seconds_since_heartbeat": round(now - beat, 1),
            "parent_run_id": record.get("parent_run_id"),
            "parent_run_status": _run_status(record.get("parent_run_id")),
            "trials": {},
        }
    for trial in trials:
        worker = trial.user_attrs.get(TrialAttr.WORKER)
        if worker:
            entry = workers.setdefault(worker, {"state": "unknown", "trials": {}})
            state = trial.state.name.lower()
            entry["trials"][state] = entry["trials"].get(state, 0) + 1
    best = None
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    if completed:
        from qi.study.best import best_trial

        chosen = best_trial(study)
        best = {
            "number": chosen.number,
            "value": chosen.value,
            "params": chosen.params,
            "run_id": chosen.user_attrs.get(TrialAttr.RUN_ID),
        }
    running = [
        {
            "number": t.number,
            "worker": t.user_attrs.get(TrialAttr.WORKER),
            "started": _iso(t.datetime_start.timestamp()) if t.datetime_start else None,
            "run_id": t.user_attrs.get(TrialAttr.RUN_ID),
        }
        for t in trials
        if t.state == TrialState.RUNNING
    ]
    return {
        "study": study_name,
        "storage": label,
        "direction": study.direction.name.lower(),
        "trials": dict(Counter(t.state.name.lower() for t in trials)),
        "total_trials": len(trials),
        "best": best,
        "running": running,
        "workers": workers,
    }


def format_status(status: dict) -> str:
    """The status as a few lines for a terminal."""
    counts = ", ".join(f"{n} {state}" for state, n in sorted(status["trials"].items()))
    lines = [
        f"study '{status['study']}' in {status['storage']}: {status['total_trials']} trials"
        + (f" ({counts})" if counts else "")
    ]
    best = status["best"]
    if best:
        lines.append(
            f"best: trial {best['number']}, value {best['value']:.4f}, run {best['run_id']}"
        )
        lines.append("  " + ", ".join(f"{k}={v}" for k, v in sorted(best["params"].items())))
    else:
        lines.append("best: no complete trial yet")
    for trial in status["running"]:
        lines.append(
            f"running: trial {trial['number']} on {trial['worker']} since {trial['started']}"
        )
    if status["workers"]:
        lines.append("workers:")
    for worker, entry in sorted(status["workers"].items()):
        trials = ", ".join(f"{n} {s}" for s, n in sorted(entry["trials"].items())) or "none"
        beat = entry.get("seconds_since_heartbeat")
        heard = f"last heartbeat {beat:.0f} s ago" if beat is not None else "no heartbeat"
        parent = entry.get("parent_run_id")
        run = f"parent run {parent} {entry.get('parent_run_status')}" if parent else "no run"
        lines.append(f"  {worker}: {entry['state']}, {heard}; {run}; trials: {trials}")
    return "\n".join(lines)
