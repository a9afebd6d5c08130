"""Recovering from dead workers: trials and runs that a killed process left RUNNING.

A worker killed by SIGKILL, a power cut or a lost machine cannot mark its own trial or close
its own runs; a live worker (or the next one to start) does it, in three ways:

* **Trials, any host (database storages).** Optuna's heartbeat: each running trial beats
  every ``heartbeat_interval`` seconds; a trial silent for ``grace_period`` is failed by the
  next worker that starts a trial, and :class:`StaleTrialCleanup` closes its MLflow runs and
  enqueues it again (Optuna's :class:`~optuna.storages.RetryHeartbeatStaleTrialCallback`), so
  a live worker retries it.
* **Trials, this host (journal files, which have no heartbeat).** The trial records its
  worker as ``host:pid``; a worker on the same host sees that the process is gone.
* **Workers.** A worker dies after its last trial, during evaluation or registration: no
  trial is left to go stale, yet its parent run is RUNNING. Each worker beats on the study
  too (:class:`WorkerBeat`, a study user attribute naming its parent run); a worker silent
  for ``grace_period`` (or, on this host, whose process is gone) has its parent run closed
  KILLED by whoever looks next: a starting worker, a worker before it evaluates, or
  ``qi study status``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import warnings
from datetime import UTC, datetime

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from qi.tags import Tag, TrialAttr
from qi.tags import TrialState as RunTrialState
from qi.tracking import end_run, run_status

log = logging.getLogger(__name__)

WORKER_ATTR = "qi.worker:"  # + worker id: a study user attribute per worker
RUNNING, FINISHED, DEAD = "running", "finished", "dead"


def worker_host() -> str:
    """This machine's name; ``QI_WORKER_HOST`` overrides it (containers that share a
    hostname, or tests that play several machines)."""
    return os.environ.get("QI_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    """``host:pid`` of this worker: who ran a trial, and whether it still lives."""
    return f"{worker_host()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_on_this_host(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    return host == worker_host() and pid.isdigit() and not process_alive(int(pid))


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def close_trial_runs(trial: FrozenTrial, reason: str) -> None:
    """End a dead trial's child run FAILED and its worker's parent run KILLED, tagged."""
    run_id = trial.user_attrs.get(TrialAttr.RUN_ID)
    if run_id and run_status(run_id) == "RUNNING":
        end_run(run_id, "FAILED", {Tag.TRIAL_STATE: RunTrialState.FAILED, Tag.ERROR: reason})
    parent_id = trial.user_attrs.get(TrialAttr.PARENT_RUN_ID)
    if parent_id and run_status(parent_id) == "RUNNING":
        end_run(parent_id, "KILLED", {Tag.ERROR: reason})


class StaleTrialCleanup:
    """Optuna's ``heartbeat_stale_trial_callback``: close the dead trial's MLflow runs, then
    enqueue the trial again so that a live worker runs it (at most ``max_retry`` times)."""

    def __init__(self, max_retry: int = 2) -> None:
        with warnings.catch_warnings():  # experimental since Optuna 2.8, still
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        worker = trial.user_attrs.get(TrialAttr.WORKER, "?")
        reason = f"worker {worker} stopped sending heartbeats; failed by {worker_id()}"
        log.warning("trial %d: %s; it is retried", trial.number, reason)
        close_trial_runs(trial, reason)
        self.retry(study, trial)


def fail_stale_local_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead workers on this host FAILED, in Optuna and in MLflow."""
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialAttr.WORKER, "")
        if not _dead_on_this_host(worker):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        close_trial_runs(trial, f"worker {worker} died during the trial")
        failed += 1
    return failed


def fail_stale_trials(study: optuna.Study) -> int:
    """Every kind of trial recovery this storage allows; returns the trials failed here."""
    before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    with warnings.catch_warnings():  # experimental since Optuna 2.9, still
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # database storages with heartbeats
    fail_stale_local_trials(study)
    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before


def worker_records(study: optuna.Study) -> dict[str, dict]:
    """Every worker that joined the study: its parent run, last beat and state."""
    return {
        key[len(WORKER_ATTR) :]: value
        for key, value in study.user_attrs.items()
        if key.startswith(WORKER_ATTR) and isinstance(value, dict)
    }


def is_dead(record: dict, worker: str, grace_period: float, now: float | None = None) -> bool:
    if record.get("state") != RUNNING:
        return record.get("state") == DEAD
    silent = (now or time.time()) - float(record.get("beat", 0))
    return silent > grace_period or _dead_on_this_host(worker)


def close_dead_workers(study: optuna.Study, grace_period: float) -> list[str]:
    """Close the parent runs of workers that died (see the module docstring)."""
    closed = []
    now = time.time()
    for worker, record in worker_records(study).items():
        if record.get("state") != RUNNING or not is_dead(record, worker, grace_period, now):
            continue
        reason = (
            f"worker {worker} died: no heartbeat since {_when(float(record['beat']))}; "
            f"closed by {worker_id()}"
        )
        parent_id = record.get("parent_run_id")
        if parent_id and run_status(parent_id) == "RUNNING":
            end_run(parent_id, "KILLED", {Tag.ERROR: reason})
        study.set_user_attr(WORKER_ATTR + worker, {**record, "state": DEAD, "reason": reason})
        log.warning(reason)
        closed.append(worker)
    return closed


class WorkerBeat:
    """This worker's heartbeat on the study, from a daemon thread: what it runs (its parent
    run) and that it still lives. ``stop`` records how it ended."""

    def __init__(self, study: optuna.Study, parent_run_id: str, interval: float) -> None:
        self.study, self.interval = study, interval
        self.key = WORKER_ATTR + worker_id()
        self.record = {
            "parent_run_id": parent_run_id,
            "host": worker_host(),
            "pid": os.getpid(),
            "started": time.time(),
            "state": RUNNING,
        }
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="qi-worker-beat", daemon=True)

    def start(self) -> WorkerBeat:
        self._write()
        self._thread.start()
        return self

    def _write(self, **changes) -> None:
        self.record.update(changes, beat=time.time())
        self.study.set_user_attr(self.key, dict(self.record))

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self._write()
            except Exception as exc:  # a lost beat is retried; a dead database ends the study
                log.warning("worker heartbeat not recorded: %s", str(exc).splitlines()[0])

    def __enter__(self) -> WorkerBeat:
        return self.start()

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.stop(FINISHED)
        else:
            self.stop("interrupted" if issubclass(kind, KeyboardInterrupt) else "failed")

    def stop(self, state: str = FINISHED) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.interval + 5)
        try:
            self._write(state=state)
        except Exception as exc:
            log.warning("worker end not recorded: %s", str(exc).splitlines()[0])
