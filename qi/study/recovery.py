"""Recovering from dead workers: trials and runs that a killed process left RUNNING.

A worker killed by SIGKILL or a power cut cannot mark its own trial; the next worker on the
same host sees that the recorded process is gone and marks the trial FAIL in Optuna (through
``Study.tell``, Optuna's public API) and its runs FAILED/KILLED in MLflow.
"""

from __future__ import annotations

import logging
import os
import socket

import optuna
from optuna.trial import TrialState

from qi.tags import Tag, TrialAttr
from qi.tags import TrialState as RunTrialState
from qi.tracking import end_run, run_status

log = logging.getLogger(__name__)


def fail_stale_local_trials(study: optuna.Study) -> int:
    """Mark RUNNING trials of dead workers on this host FAILED, in Optuna and in MLflow."""
    host = socket.gethostname()
    failed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(TrialAttr.WORKER, "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        run_id = trial.user_attrs.get(TrialAttr.RUN_ID)
        if run_id:
            end_run(
                run_id,
                "FAILED",
                {
                    Tag.TRIAL_STATE: RunTrialState.FAILED,
                    Tag.ERROR: f"worker {worker} died during the trial",
                },
            )
        parent_id = trial.user_attrs.get(TrialAttr.PARENT_RUN_ID)
        if parent_id and run_status(parent_id) == "RUNNING":
            end_run(parent_id, "KILLED", {Tag.ERROR: f"worker {worker} died"})
        failed += 1
    return failed


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
