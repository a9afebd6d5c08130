"""Ctrl-C always stops a worker: a signal at each phase, also when Python drops it.

Deterministic: the signal is sent from a :func:`qi.interrupts.listen` callback when the
worker enters the phase for the n-th time, so it lands in that phase on every run; no sleep
decides anything. "dropped" sends it from inside a finalizer (``__del__``), where Python
prints "Exception ignored" and swallows the ``KeyboardInterrupt``: the worker must still stop,
at its next checkpoint. All cases run in one subprocess (a stray SIGINT must never reach
pytest itself), each on its own store.
"""

import json
import subprocess
import sys

import pytest

# (phase, occurrence): the n-th entry of the phase gets the signal
CASES = [
    ("data", 1),
    ("fit", 1),
    ("fit", 4),
    ("validation", 1),
    ("validation", 2),
    ("between_trials", 1),
    ("between_trials", 2),
    ("evaluation", 1),
    ("registration", 1),
]

SCRIPT = r"""
import json, os, signal, sys
from pathlib import Path
import mlflow, optuna
from click.testing import CliRunner
from qi import interrupts
from qi.cli import cli
from qi.storage import open_storage

data_dir, root, cases = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])

class DroppedInFinalizer:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10000):  # the handler runs in here: its KeyboardInterrupt is dropped
            pass

results = []
for index, (phase, occurrence, how) in enumerate(cases):
    folder = root / f"case{index}"
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    seen = {"count": 0, "sent": False}

    def listener(name, phase=phase, occurrence=occurrence, how=how, seen=seen):
        if name != phase or seen["sent"]:
            return
        seen["count"] += 1
        if seen["count"] == occurrence:
            seen["sent"] = True
            if how == "dropped":
                DroppedInFinalizer()  # made and dropped at once: __del__ runs here
            else:
                os.kill(os.getpid(), signal.SIGINT)

    with interrupts.listen(listener):
        result = CliRunner().invoke(cli, [
            "tune", "--data-dir", data_dir, "--n-trials", "2", "--epochs", "2",
            "--image-size", "32", "--batch-size", "16", "--models", "cnn",
            "--pruner", "none", "--timeout", "0", "--study-name", "s",
            "--storage", str(folder / "s.journal"), "--tracking-uri", uri,
            "--experiment", "e", "--no-progress",
        ])
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    trials = []
    try:
        storage = open_storage(str(folder / "s.journal"), uri)
        trials = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
    except Exception:
        pass
    results.append({
        "case": [phase, occurrence, how], "sent": seen["sent"], "exit": result.exit_code,
        "output": result.output[-600:], "trials": trials,
        "runs": [{"status": r.info.status, "kind": r.data.tags.get("qi.kind"),
                  "interrupted": r.data.tags.get("qi.interrupted"),
                  "trial_state": r.data.tags.get("qi.trial_state")} for r in runs],
    })
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow
def test_a_signal_at_every_phase_stops_the_worker(tiny_casting, tmp_path):
    dropped = [(p, 1, "dropped") for p in ("fit", "between_trials", "registration")]
    cases = [(p, n, "raised") for p, n in CASES] + dropped
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_casting), str(tmp_path), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    for result in json.loads(lines[-1][len("RESULTS ") :]):
        case = result["case"]
        assert result["sent"], f"{case}: the phase never came"
        assert result["exit"] == 130, (case, result["output"])
        assert "interrupted" in result["output"], case
        assert "RUNNING" not in result["trials"], (case, result["trials"])
        assert all(r["status"] != "RUNNING" for r in result["runs"]), (case, result["runs"])
        parents = [r for r in result["runs"] if r["kind"] == "tune"]
        if case[0] != "data":  # the parent run exists once the data is ready
            assert parents and parents[0]["status"] == "KILLED", (case, result["runs"])
            assert parents[0]["interrupted"] == "true", case
        if case[0] in ("fit", "validation"):  # stopped inside a trial: that trial says so
            states = [r["trial_state"] for r in result["runs"] if r["kind"] == "trial"]
            assert "interrupted" in states, (case, result["runs"])
