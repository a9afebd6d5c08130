"""Good-only detection: qi's PatchCore-style detector trained on good images only.

    python benchmarks/anomaly.py                         # ELPV mono cells and the castings
    python benchmarks/anomaly.py --neighbourhood 1 --strides 8,16
    python benchmarks/anomaly.py --study 1               # also `qi tune --method anomaly`
    python benchmarks/anomaly.py --quick                 # smoke run (used by the tests)

- ELPV monocrystalline cells (elpv-dataset, CC BY-NC-SA: measure, never commit), the 75/25
  split of ``benchmarks/real_data.py``: the bank sees the *functional* training cells only,
  defective training cells go to validation (where the threshold is chosen), the test split
  is the one the supervised study is scored on; 224 px, as the study's backbones;
- the embedded castings (128 px), trained on good images only the same way.

Printed per data set: test ROC AUC (and per defect kind where the data names kinds),
accuracy at the chosen threshold, fit seconds, memory-bank MB, peak memory of this process,
and ms per image through torch, the pyfunc and ONNX Runtime (batches of 32).

With ``--study 1``, after the defaults, the study a user runs on the same folder: ``qi tune
--method anomaly`` at its default budget and search space, in a subprocess with a fresh MLflow
store and cache (as ``benchmarks/real_data.py`` runs the supervised one), choosing the
detector's settings on validation (where the training defects went); printed: the registered
model's test ROC AUC and accuracy at its threshold, its settings, trials, wall time and peak
memory.

Beside it, where anomalib is installed (the ``bench`` extra), anomalib's own PatchCore
(``PatchcoreModel``: its 3x3 feature pooling, memory bank, k-centre greedy coreset, re-weighted
image score and anomaly map) on the same images, the same encoder stages and the same coreset
ratio: test ROC AUC, fit seconds, bank MB, ms per image. Its feature extractor is given qi's
encoder stages directly: anomalib traces an ``nn.Module`` backbone with torch.fx, which
timm's TensorFlow "same" padding (computed from the input size at run time) does not survive.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _common import benchmark_args
from sklearn.metrics import roc_auc_score

from qi.anomaly.fitting import detector_data, fit_detector
from qi.config import DataConfig, DetectorConfig, RunConfig, SynthConfig
from qi.data.datamodule import prepare_data
from qi.inference import ModelSpec, defect_probabilities
from qi.models.patchcore import detector_backbone
from qi.runtime import keep_freed_memory


def _ms_per_image(score, images: np.ndarray, batch: int = 32, repeats: int = 3) -> float:
    chunk = images[:batch]
    score(chunk)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        score(chunk)
    return (time.perf_counter() - started) * 1000 / (repeats * len(chunk))


def _onnx_ms(net, spec: ModelSpec, images: np.ndarray, folder: Path) -> float:
    import onnxruntime

    from qi.export import write_onnx

    path = folder / "model.onnx"
    write_onnx(net, spec, path, "benchmark")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _ms_per_image(lambda b: session.run(None, {"image": b}), images)


DEFAULTS = DetectorConfig()  # qi train --method anomaly's settings


class _QiStages(torch.nn.Module):
    """qi's encoder stages as anomalib's feature extractor: layer name -> feature map."""

    def __init__(self, net, layers: list[str]) -> None:
        super().__init__()
        self.net, self.layers = net, layers

    def train(self, mode: bool = True) -> _QiStages:
        """Frozen, as anomalib's own extractor keeps its backbone: batch norm in eval mode
        even while PatchCore "trains" (collects its patches)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        normalised = (x - self.net.mean) / self.net.std
        maps = self.net.encoder.stage_features(normalised, self.net.stage_indices)
        return dict(zip(self.layers, maps, strict=True))


@torch.inference_mode()
def measure_anomalib(net, data, detector: DetectorConfig) -> None:
    """anomalib's PatchCore on qi's encoder stages (see the module docstring)."""
    try:
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    except ImportError:
        print("anomalib PatchCore: not run (anomalib is not installed: pip install -e '.[bench]')")
        return
    # a random ResNet-18 (nothing downloaded) stands in until the extractor is replaced; qi's
    # stages take its layers' names, which anomalib checks against the stand-in
    layers = [f"layer{i + 2}" for i in range(len(detector.stage_strides))]
    model = PatchcoreModel(layers=layers, backbone="resnet18", pre_trained=False)
    model.feature_extractor = _QiStages(net, layers)
    good, labels = data.split("train")
    good = good[labels == 0]

    def tensor(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float()

    started = time.perf_counter()
    model.train()
    for start in range(0, len(good), 16):
        model(tensor(good[start : start + 16]))
    model.subsample_embedding(detector.coreset_ratio)
    fit_seconds = time.perf_counter() - started
    model.eval()
    images, labels = data.split("test")

    def score(batch: np.ndarray) -> np.ndarray:
        return model(tensor(batch)).pred_score.reshape(-1).numpy()

    scores = np.concatenate([score(images[s : s + 16]) for s in range(0, len(images), 16)])
    bank_mb = model.memory_bank.numel() * model.memory_bank.element_size() / 2**20
    print(
        f"anomalib PatchCore (2.x, same encoder stages, coreset {detector.coreset_ratio}): "
        f"test ROC AUC {roc_auc_score(labels, scores):.4f}, fit {fit_seconds:.1f} s, "
        f"bank {len(model.memory_bank)} patches ({bank_mb:.1f} MB fp32), "
        f"{_ms_per_image(score, images):.1f} ms per image"
    )


def measure(
    name: str, root: Path, size: int, detector: DetectorConfig, with_anomalib: bool
) -> None:
    config = RunConfig(
        data=DataConfig(data_dir=root, image_size=size, color_mode="gray"), detector=detector
    )
    data = detector_data(
        prepare_data(config.data, progress=False, good_only=True), config.data.seed
    )
    started = time.perf_counter()
    result, summary = fit_detector(config, data)
    fit_seconds = time.perf_counter() - started
    net = result.net
    images, labels = data.split("test")
    scores = defect_probabilities(net, images)
    predicted = scores >= 0.5
    frame = data.split_frame("test")
    print(f"\n## {name}: {int((labels == 0).sum())} good / {int(labels.sum())} defective test")
    train_good = int((data.frame["split"] == "train").sum())
    print(
        f"train good images {train_good}, validation defects {summary.validation_defects}, "
        f"bank {summary.bank_patches} of {summary.candidate_patches} patches "
        f"({summary.bank_mb:.2f} MB fp16)"
    )
    print(f"test ROC AUC {roc_auc_score(labels, scores):.4f}")
    print(f"test accuracy at the threshold {np.mean(predicted == labels):.4f}")
    kinds = frame.loc[frame["label"] == 1, "defect_type"].unique()
    if len(kinds) > 1:
        for kind in sorted(kinds):
            mask = (frame["label"] == 0) | (frame["defect_type"] == kind)
            auc = roc_auc_score(labels[mask.to_numpy()], scores[mask.to_numpy()])
            print(f"  ROC AUC {kind}: {auc:.4f} ({int((frame['defect_type'] == kind).sum())})")
    print(f"fit seconds {fit_seconds:.1f} (bank of {train_good} images, validation scored)")
    spec = ModelSpec(
        model=replace(config.model, name=detector_backbone(config.model)),
        preprocess=data.preprocess,
        method="anomaly",
        detector=detector,
    )
    torch_ms = _ms_per_image(lambda b: defect_probabilities(net, b), images)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_ms = _onnx_ms(net, spec, images, Path(tmp))
    print(f"ms per image: torch {torch_ms:.1f}, ONNX Runtime {onnx_ms:.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(f"peak memory of this process so far {peak} MiB")
    if with_anomalib:
        measure_anomalib(net, data, detector)


def measure_study(name: str, root: Path, folder: Path, quick: bool) -> None:
    """``qi tune --method anomaly`` on ``root`` as a user runs it (see the module docstring)."""
    import mlflow
    from real_data import best_params, figures, run_qi, study_parent

    from qi.services import interpreter_env

    folder.mkdir(parents=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    env = interpreter_env(MLFLOW_TRACKING_URI=uri, QI_CACHE_DIR=str(folder / "cache"))
    command = ["tune", "--data-dir", str(root), "--method", "anomaly", "--no-progress"]
    command += ["--experiment", "anomaly-study"]
    if quick:
        command += ["--n-trials", "2", "--image-size", "64"]
    seconds, peak, _ = run_qi(command, env)
    mlflow.set_tracking_uri(uri)
    parent = study_parent("anomaly-study")
    row = figures(parent)
    best = best_params(parent)
    trials = int(parent.data.metrics.get("trials_total", 0))
    print(
        f"{name}, qi tune --method anomaly (default study): test ROC AUC {row['roc_auc']:.4f}, "
        f"accuracy at the threshold {row['acc@op']:.4f}, {trials} trials, {seconds:.0f} s, "
        f"peak memory of the qi process {peak} MiB\n  best settings {best}"
    )


def main() -> None:
    args = benchmark_args(
        __doc__,
        quick={"sets": "castings", "castings_images": 120},
        sets="elpv,castings",
        strides=",".join(str(s) for s in DEFAULTS.stage_strides),
        neighbourhood=DEFAULTS.neighbourhood,
        coreset_ratio=DEFAULTS.coreset_ratio,
        neighbours=DEFAULTS.neighbours,
        elpv_size=224,
        castings_images=1600,
        anomalib=1,  # 0: qi's detector only (anomalib's coreset is slow at large ratios)
        study=0,  # 1: also the default `qi tune --method anomaly` on each data set
    )
    keep_freed_memory()
    detector = DetectorConfig(
        method="anomaly",
        stage_strides=tuple(int(s) for s in args.strides.split(",")),
        neighbourhood=args.neighbourhood,
        coreset_ratio=args.coreset_ratio,
        neighbours=args.neighbours,
    )
    print(f"detector: {detector}")
    sets = args.sets.split(",")
    with tempfile.TemporaryDirectory(prefix="qi-anomaly-") as tmp:
        if "elpv" in sets:
            sys.path.insert(0, str(Path(__file__).parent))
            from real_data import elpv_installed, write_elpv

            if elpv_installed():
                root = write_elpv("mono", Path(tmp) / "elpv")
                measure("ELPV mono", root, args.elpv_size, detector, bool(args.anomalib))
                if args.study or args.quick:
                    measure_study("ELPV mono", root, Path(tmp) / "elpv-study", args.quick)
            else:
                print("elpv-dataset is not installed: pip install -e '.[bench]'")
        if "castings" in sets:
            from qi.data import synth

            n = args.castings_images
            root = synth.generate(
                Path(tmp) / "castings",
                SynthConfig(n_train=int(n * 0.8), n_test=n - int(n * 0.8)),
                progress=False,
            )
            measure("castings", root, 128, detector, bool(args.anomalib))
            if args.study or args.quick:
                measure_study("castings", root, Path(tmp) / "castings-study", args.quick)


if __name__ == "__main__":
    main()
