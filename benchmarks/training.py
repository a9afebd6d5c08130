"""Training throughput: qi's fit (Lightning, torchmetrics, MLflow logging) vs a plain loop.

    python benchmarks/training.py            # embedded data, default CNN, 128 px, 3 epochs, CPU
    python benchmarks/training.py --quick    # smoke run (used by the tests)

Both sides train the same network on the same loaders (same augmentation, batch size and
data), with one validation pass per epoch, in the same process, at the same precision. The
plain loop is what a notebook would write: forward, BCE loss, backward, AdamW step, a
validation forward pass. Each precision is measured: full fp32, and the mixed precision qi
picks by default when this machine computes it natively (bf16 autocast).
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import torch
from _common import benchmark_args
from torch import nn

from qi.config import DataConfig, RunConfig, SynthConfig, TrainConfig
from qi.data.datamodule import InspectionDataModule, prepare_data
from qi.fit import fit
from qi.fit.precision import trainer_precision
from qi.models import build_model


def plain_loop(config: RunConfig, data, epochs: int) -> float:
    """Seconds for ``epochs`` of a hand-written loop over the same loaders."""
    torch.manual_seed(config.train.seed)
    bf16, device = config.train.precision == "bf16-mixed", "cpu"
    net = build_model(config.model, data.preprocess.channels).to(memory_format=torch.channels_last)
    module = InspectionDataModule(data, config.data)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(data.positive_weight()))
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.train.learning_rate, weight_decay=config.train.weight_decay
    )
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for images, labels in module.train_dataloader():
            images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net(images).float(), labels)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            for images, labels in module.val_dataloader():
                loss_fn(net(images.contiguous(memory_format=torch.channels_last)).float(), labels)
    return time.perf_counter() - started


def qi_fit(config: RunConfig, data, epochs: int, store: Path) -> float:
    store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=str(store / "artifacts"))
    run = mlflow.MlflowClient().create_run(experiment)
    config = replace(
        config, train=replace(config.train, epochs=epochs, early_stopping_patience=epochs + 1)
    )
    result = fit(config, data, run_id=run.info.run_id, progress=False)
    return result.seconds


def main() -> None:
    args = benchmark_args(
        __doc__, quick={"epochs": 1, "image_size": 48}, epochs=3, image_size=128, batch_size=32
    )
    synth = SynthConfig()
    if args.quick:
        synth = SynthConfig(n_train=120, n_test=20, image_size=48)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:  # the real run reuses the embedded set from the qi cache
            os.environ["QI_CACHE_DIR"] = str(Path(tmp) / "cache")
        config = RunConfig(
            data=DataConfig(image_size=args.image_size, batch_size=args.batch_size),
            train=TrainConfig(accelerator="cpu"),  # both sides on the CPU, GPU or not
            synth=synth,
        )
        data = prepare_data(config.data, synth, progress=False)
        n_train = int((data.frame["split"] == "train").sum())
        precisions = dict.fromkeys(["32-true", trainer_precision(config.train)])
        if not args.quick:
            plain_loop(config, data, 1)  # warm-up: allocator, kernels
        timings = []
        for i, precision in enumerate(precisions):
            at = replace(config, train=replace(config.train, precision=precision))
            plain = plain_loop(at, data, args.epochs)
            ours = qi_fit(at, data, args.epochs, Path(tmp) / str(i))
            timings.append((precision, plain, ours))
    images = n_train * args.epochs
    print(
        f"{n_train} training images of {args.image_size} px, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) each with a validation pass; torch threads "
        f"{torch.get_num_threads()}; qi's default precision here: "
        f"{trainer_precision(config.train)}"
    )
    print(f"{'loop':<40}{'precision':>11}{'seconds':>9}{'images/s':>10}{'vs plain':>10}")
    for precision, plain, ours in timings:
        for name, seconds in (
            ("plain PyTorch loop", plain),
            ("qi fit (Lightning + metrics + MLflow)", ours),
        ):
            print(
                f"{name:<40}{precision:>11}{seconds:>9.1f}{images / seconds:>10.0f}"
                f"{plain / seconds:>10.0%}"
            )


if __name__ == "__main__":
    main()
