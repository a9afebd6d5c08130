"""Which defect: the default study on the embedded castings with and without defect types.

    python benchmarks/defect_types.py                # --defect-types auto and off, default study
    python benchmarks/defect_types.py --timeout 120  # a shorter budget for each study
    python benchmarks/defect_types.py --quick        # smoke run (used by the tests)

Each study is `qi tune` as a user runs it (its default search and budget, the same seed), in
its own process, one after the other. Printed per setting: the types learned, the binary
test figures at the model's threshold (accuracy, F1, ROC AUC), type accuracy and macro F1 of
the types among the caught test defects, the (ok + types) macro F1, trials and wall seconds.
The issue's target: type macro F1 >= 0.95 with the binary accuracy not lower than without.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from _common import benchmark_args

from qi.services import interpreter_env


def study(data_dir: Path | None, setting: str, env: dict[str, str], args) -> dict[str, float]:
    """Run one default study; the figures of its parent run."""
    experiment = f"types-{setting}"
    command = [sys.executable, "-m", "qi.cli", "tune", "--no-progress", "--experiment",
               experiment, "--study-name", experiment, "--defect-types", setting,
               "--no-register"]  # fmt: skip
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    if args.timeout:
        command += ["--timeout", str(args.timeout)]
    if args.n_trials:
        command += ["--n-trials", str(args.n_trials)]
    if args.quick:
        command += ["--epochs", "2", "--image-size", "32", "--models", "cnn"]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"qi tune --defect-types {setting} failed:\n{done.stderr[-3000:]}")
    seconds = time.perf_counter() - started
    (parent,) = [
        r
        for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
        if r.data.tags.get("qi.kind") == "tune"
    ]
    m = parent.data.metrics
    nan = float("nan")
    return {
        "acc": m["test/acc"],
        "f1": m["test/f1"],
        "auroc": m["test/auroc"],
        "type_acc": m.get("test/type_accuracy_caught", nan),
        "type_f1": m.get("test/type_macro_f1", nan),
        "ok_types_f1": m.get("test/ok_and_types_macro_f1", nan),
        "trials": m.get("trials_total", nan),
        "seconds": seconds,
        "best": parent.data.params.get("best.model.name", "?"),
    }


def main() -> None:
    args = benchmark_args(__doc__, quick={"timeout": 20.0, "n_trials": 1}, timeout=0.0, n_trials=0)
    with tempfile.TemporaryDirectory(prefix="qi-types-") as tmp:
        root = Path(tmp)
        data_dir = None  # the embedded castings
        if args.quick:
            from qi.config import SynthConfig
            from qi.data import synth

            data_dir = synth.generate(
                root / "data", SynthConfig(n_train=200, n_test=60, image_size=48), progress=False
            )
        uri = f"sqlite:///{root / 'mlflow.db'}"
        env = interpreter_env(MLFLOW_TRACKING_URI=uri)
        mlflow.set_tracking_uri(uri)
        rows = {s: study(data_dir, s, env, args) for s in ("auto", "off")}
    print(f"embedded castings{' (quick stand-in)' if args.quick else ''}; {os.cpu_count()} CPUs")
    print(
        f"{'types':<6}{'best model':>22}{'acc':>8}{'F1':>8}{'ROC AUC':>9}{'type acc':>10}"
        f"{'type F1':>9}{'ok+types F1':>13}{'trials':>8}{'wall s':>8}"
    )
    for setting, r in rows.items():
        print(
            f"{setting:<6}{r['best']:>22}{r['acc']:>8.4f}{r['f1']:>8.4f}{r['auroc']:>9.4f}"
            f"{r['type_acc']:>10.4f}{r['type_f1']:>9.4f}{r['ok_types_f1']:>13.4f}"
            f"{r['trials']:>8.0f}{r['seconds']:>8.0f}"
        )


if __name__ == "__main__":
    main()
