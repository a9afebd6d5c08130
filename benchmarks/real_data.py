"""Real-data quality: the default ``qi tune`` on the ELPV solar cells, as a user would run it.

    pip install -e ".[bench]"                  # elpv-dataset (CC BY-NC-SA: measure, never commit)
    python benchmarks/real_data.py             # monocrystalline cells, default study, cold cache
    python benchmarks/real_data.py --cells poly          # the held-back polycrystalline cells
    python benchmarks/real_data.py --ablations            # single `qi train` variants, a table
    python benchmarks/real_data.py --quick                # smoke run (used by the tests)

The cells of one type (``mono`` by default) are labelled defective when their defect
probability is >= 0.5 and split 75/25, stratified, seed 42 (as Deitsch et al. 2019), then
written as a qi split-folder layout (``train/{ok,defective}``, ``test/{ok,defective}``, and a
``defect_types.csv`` naming how sure the annotators were: ``p=1.00`` or ``p=0.67``). qi carves
its validation split out of train. The study runs in a subprocess with a fresh MLflow store
and, unless ``--warm``, a fresh qi cache, so decoding and feature extraction are counted.

Printed: test accuracy, ROC AUC, defect recall and false-alarm rate at 0.5 and at the
operating point, wall time and peak memory of the ``qi tune`` process. Without
``elpv-dataset`` installed, ``--quick`` runs on a small synthetic stand-in and says so.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from _common import benchmark_args

from qi.services import interpreter_env

SEED = 42

ABLATIONS = {  # name -> `qi train` arguments, each a single change or a candidate recipe
    "cnn 128 px (qi train defaults)": [],
    "cnn, avg pooling": ["--pooling", "avg"],
    "cnn, avgmax pooling": ["--pooling", "avgmax"],
    "cnn, unweighted loss": ["--no-balance-classes"],
    "cnn, dihedral augmentation": ["--augmentation", "dihedral"],
    "cnn 224 px": ["--image-size", "224"],
    "cnn, avgmax + dihedral": ["--pooling", "avgmax", "--augmentation", "dihedral"],
    "cnn, avgmax + dihedral + 8 test-time views": [
        "--pooling", "avgmax", "--augmentation", "dihedral", "--test-time-views", "8",
    ],
    "cnn 8 test-time views": ["--test-time-views", "8"],
    "lite0 head, 224 px, avgmax": [
        "--model", "efficientnet_lite0", "--finetune", "head", "--image-size", "224",
        "--pooling", "avgmax", "--epochs", "40",
    ],
    "lite0 head, + 8 test-time views": [
        "--model", "efficientnet_lite0", "--finetune", "head", "--image-size", "224",
        "--pooling", "avgmax", "--epochs", "40", "--test-time-views", "8",
    ],
    "lite0 head, + unweighted loss": [
        "--model", "efficientnet_lite0", "--finetune", "head", "--image-size", "224",
        "--pooling", "avgmax", "--epochs", "40", "--test-time-views", "8",
        "--no-balance-classes",
    ],
    "lite0 head, + 8 test-time views + stages 16,32": [
        "--model", "efficientnet_lite0", "--finetune", "head", "--image-size", "224",
        "--pooling", "avgmax", "--epochs", "40", "--test-time-views", "8",
        "--feature-stages", "16,32",
    ],
    "lite0 last third, 224 px": [
        "--model", "efficientnet_lite0", "--finetune", "last", "--image-size", "224",
        "--pooling", "avgmax", "--epochs", "12", "--augmentation", "dihedral",
        "--learning-rate", "0.001",
    ],
}  # fmt: skip


def write_elpv(cells: str, out: Path) -> Path:
    """The ELPV cells of one type as a split-folder layout (see the module docstring)."""
    import cv2
    from elpv_dataset.utils import load_dataset
    from sklearn.model_selection import train_test_split

    images, probability, types = load_dataset()
    chosen = np.flatnonzero(types == cells)
    labels = (probability[chosen] >= 0.5).astype(int)
    train, test = train_test_split(chosen, test_size=0.25, random_state=SEED, stratify=labels)
    rows = []
    for split, indices in (("train", train), ("test", test)):
        for i in indices:
            label = "defective" if probability[i] >= 0.5 else "ok"
            relative = f"{split}/{label}/cell{i:04d}.png"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(out / relative), images[i])
            if label == "defective":
                rows.append(f"{relative},p={probability[i]:.2f}")
    (out / "defect_types.csv").write_text("path,defect_type\n" + "\n".join(rows) + "\n")
    return out


def elpv_installed() -> bool:
    try:
        import elpv_dataset  # noqa: F401
    except ImportError:
        return False
    return True


def write_stand_in(out: Path) -> Path:
    """A small synthetic class-folder set for --quick without elpv-dataset installed."""
    from qi.config import SynthConfig
    from qi.data import synth

    return synth.generate(out, SynthConfig(n_train=60, n_test=24, image_size=48), progress=False)


def run_qi(arguments: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds, peak memory in MiB, output) of one ``qi`` process."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "qi.cli", *arguments],
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"qi {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, peak_kib // 1024, done.stdout


def study_parent(experiment: str):
    """The parent run of the one ``qi tune`` logged in ``experiment``."""
    (parent,) = [
        r
        for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")
        if r.data.tags.get("qi.kind") == "tune"
    ]
    return parent


def best_params(parent) -> dict[str, str]:
    """The best trial's settings, as the study logged them on its parent run."""
    return {k[5:]: v for k, v in parent.data.params.items() if k.startswith("best.")}


def figures(run) -> dict[str, float]:
    """Test figures of a run at 0.5 and at its operating threshold."""
    m = run.data.metrics
    return {
        "acc@0.5": m["test_at_0.5/acc"],
        "recall@0.5": m["test_at_0.5/defect_recall"],
        "false alarms@0.5": 1 - m["test_at_0.5/ok_recall"],
        "threshold": m["threshold"],
        "acc@op": m["test/acc"],
        "recall@op": m["test/defect_recall"],
        "false alarms@op": 1 - m["test/ok_recall"],
        "roc_auc": m["test/auroc"],
    }


def main() -> None:
    args = benchmark_args(
        __doc__,
        quick={"timeout": 20.0, "n_trials": 2},
        cells="mono",
        data_dir="",
        timeout=0.0,  # 0: qi tune's default budget
        n_trials=0,  # 0: qi tune's default
        ablations=0,
        only="",  # with --ablations: the variants whose name starts with this
        warm=0,
        tune_args="",  # more `qi tune` options, e.g. "--cv-folds 5 --ensemble-candidates 0"
    )
    with tempfile.TemporaryDirectory(prefix="qi-real-") as tmp:
        root = Path(tmp)
        data_dir = Path(args.data_dir) if args.data_dir else root / f"elpv-{args.cells}"
        if args.data_dir:
            source = f"the images in {args.data_dir}"
        elif elpv_installed():
            source = f"ELPV {args.cells} cells, 75/25 stratified split, seed {SEED}"
            write_elpv(args.cells, data_dir)
        elif args.quick:
            source = "synthetic stand-in (elpv-dataset not installed)"
            write_stand_in(data_dir)
        else:
            raise SystemExit('elpv-dataset is not installed: pip install -e ".[bench]"')
        uri = f"sqlite:///{root / 'mlflow.db'}"
        env = interpreter_env(MLFLOW_TRACKING_URI=uri)
        if not args.warm:
            env["QI_CACHE_DIR"] = str(root / "cache")
        mlflow.set_tracking_uri(uri)
        print(f"data: {source}; machine: {os.cpu_count()} CPUs")
        if args.ablations:
            table = ablations(data_dir, env, quick=bool(args.quick), only=args.only)
        else:
            table = default_study(data_dir, env, args)
        for line in table:
            print(line)


def default_study(data_dir: Path, env: dict[str, str], args) -> list[str]:
    command = ["tune", "--data-dir", str(data_dir), "--no-progress", "--experiment", "bench"]
    if args.timeout:
        command += ["--timeout", str(args.timeout)]
    if args.n_trials:
        command += ["--n-trials", str(args.n_trials)]
    if args.quick:
        command += ["--epochs", "2", "--image-size", "32", "--models", "cnn"]
    command += args.tune_args.split()
    seconds, peak, _ = run_qi(command, env)
    parent = study_parent("bench")
    row = figures(parent)
    trials = int(parent.data.metrics.get("trials_total", 0))
    best = best_params(parent)
    lines = [
        f"qi tune (default study{'' if not args.timeout else f', timeout {args.timeout:g} s'}"
        f"{f', {args.tune_args}' if args.tune_args else ''})",
        "| figure | value |",
        "| --- | --- |",
    ]
    lines += [f"| {k} | {v:.3f} |" for k, v in row.items()]
    lines += [
        f"| wall time | {seconds:.0f} s |",
        f"| peak memory | {peak} MiB |",
        f"| trials | {trials} |",
        f"| best trial | {best} |",
        f"| model | {parent.data.tags.get('qi.ensemble', 'the best trial')} |",
        "",
        "| trial | state | model | val objective | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    children = mlflow.search_runs(
        experiment_names=["bench"],
        filter_string="tags.`qi.kind` = 'trial'",
        output_format="list",
    )
    for run in sorted(children, key=lambda r: int(r.data.tags["qi.trial_number"])):
        p, m, t = run.data.params, run.data.metrics, run.data.tags
        model = p.get("model.name", "?")
        if model != "cnn":
            model += f" {p.get('model.finetune')}"
        stages = p.get("model.feature_stages", "none")  # a trial logs its config: "()" is none
        if stages not in ("none", "()", ""):
            model += f" + stages {stages}"
        state = t.get("qi.trial_state", "?")
        if "qi.pruned_by" in t:
            state += f" ({t['qi.pruned_by']})"
        seconds = (run.info.end_time - run.info.start_time) / 1000 if run.info.end_time else 0
        objective = m.get("objective", float("nan"))
        lines.append(
            f"| {t['qi.trial_number']} | {state} | {model} | {objective:.3f} | {seconds:.0f} |"
        )
    return lines


def ablations(data_dir: Path, env: dict[str, str], quick: bool, only: str = "") -> list[str]:
    lines = [
        "| qi train variant | acc@0.5 | roc_auc | recall@0.5 | false alarms@0.5 | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    variants = {k: v for k, v in ABLATIONS.items() if k.startswith(only)}
    if quick:
        variants = dict(list(variants.items())[:2])
    for i, (name, extra) in enumerate(variants.items()):
        experiment = f"ablation-{i}"
        command = ["train", "--data-dir", str(data_dir), "--no-progress"]
        command += ["--experiment", experiment, *extra]
        if quick:
            command += ["--epochs", "1", "--image-size", "32"]
        seconds, _, _ = run_qi(command, env)
        (run,) = mlflow.search_runs(experiment_names=[experiment], output_format="list")
        row = figures(run)
        lines.append(
            f"| {name} | {row['acc@0.5']:.3f} | {row['roc_auc']:.3f} | {row['recall@0.5']:.3f} "
            f"| {row['false alarms@0.5']:.3f} | {seconds:.0f} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


if __name__ == "__main__":
    main()
