"""Training throughput: qi's fit (Lightning, torchmetrics, MLflow logging) vs a plain loop.

    python benchmarks/training.py            # embedded data, default CNN, 128 px, 3 epochs
    python benchmarks/training.py --quick    # smoke run (used by the tests)

Both sides train the same network on the same loaders (same augmentation, batch size and
data), with one validation pass per epoch, in the same process. The plain loop is what a
notebook would write: forward, BCE loss, backward, AdamW step, a validation forward pass.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import torch
from torch import nn

from qi.config import DataConfig, RunConfig, SynthConfig, TrainConfig
from qi.data.datamodule import InspectionDataModule, prepare_data
from qi.models import build_model
from qi.training import fit


def plain_loop(config: RunConfig, data, epochs: int) -> float:
    """Seconds for ``epochs`` of a hand-written loop over the same loaders."""
    torch.manual_seed(config.train.seed)
    net = build_model(config.model, data.preprocess.channels).to(memory_format=torch.channels_last)
    module = InspectionDataModule(data, config.data)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(module.positive_weight()))
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=config.train.learning_rate, weight_decay=config.train.weight_decay
    )
    started = time.perf_counter()
    for _ in range(epochs):
        net.train()
        for images, labels in module.train_dataloader():
            images = images.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(images), labels)
            loss.backward()
            optimizer.step()
        net.eval()
        with torch.inference_mode():
            for images, labels in module.val_dataloader():
                loss_fn(net(images.contiguous(memory_format=torch.channels_last)), labels)
    return time.perf_counter() - started


def qi_fit(config: RunConfig, data, epochs: int, store: Path) -> float:
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    experiment = mlflow.create_experiment("bench", artifact_location=str(store / "artifacts"))
    run = mlflow.MlflowClient().create_run(experiment)
    config = replace(
        config, train=replace(config.train, epochs=epochs, early_stopping_patience=epochs + 1)
    )
    result = fit(config, data, run_id=run.info.run_id, run_test=False, progress=False)
    return result.seconds


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    synth = SynthConfig()
    if args.quick:
        synth = SynthConfig(n_train=120, n_test=20, image_size=48)
        args.epochs, args.image_size = 1, 48
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:  # the real run reuses the embedded set from the qi cache
            os.environ["QI_CACHE_DIR"] = str(Path(tmp) / "cache")
        config = RunConfig(
            data=DataConfig(image_size=args.image_size, batch_size=args.batch_size),
            train=TrainConfig(),
            synth=synth,
        )
        data = prepare_data(config.data, synth, progress=False)
        n_train = int((data.frame["split"] == "train").sum())
        if not args.quick:
            plain_loop(config, data, 1)  # warm-up: allocator, kernels
        plain = plain_loop(config, data, args.epochs)
        ours = qi_fit(config, data, args.epochs, Path(tmp))
    images = n_train * args.epochs
    print(
        f"{n_train} training images of {args.image_size} px, batch {args.batch_size}, "
        f"{args.epochs} epoch(s) each with a validation pass; torch threads "
        f"{torch.get_num_threads()}"
    )
    print(f"{'loop':<40}{'seconds':>9}{'images/s':>10}{'vs plain':>10}")
    for name, seconds in (
        ("plain PyTorch loop", plain),
        ("qi fit (Lightning + metrics + MLflow)", ours),
    ):
        print(f"{name:<40}{seconds:>9.1f}{images / seconds:>10.0f}{plain / seconds:>10.0%}")


if __name__ == "__main__":
    main()
