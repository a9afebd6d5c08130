"""Data pipeline: decoding, the cache, and whether loading keeps up with training.

    python benchmarks/data_pipeline.py           # the embedded data set at 128 px
    python benchmarks/data_pipeline.py --quick   # smoke run (used by the tests)

Rows: preparing the data the first time (discover, decode, preprocess: what the first trial
of a study pays) and again from the cache (what every later trial and run pays); then one
epoch of the training loader alone (augmentation, batching) next to one epoch of training
steps on the same batches, on the CPU at the precision qi picks there. The loader must be the
small number.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from _common import benchmark_args
from torch import nn

from qi.config import DataConfig, ModelConfig, SynthConfig, TrainConfig
from qi.data import synth
from qi.data.datamodule import InspectionDataModule, prepare_data
from qi.fit.precision import trainer_precision
from qi.models import build_model


def main() -> None:
    args = benchmark_args(__doc__, quick={"image_size": 48}, image_size=128)
    synth_config = SynthConfig()
    if args.quick:
        synth_config = SynthConfig(n_train=100, n_test=20, image_size=48)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["QI_CACHE_DIR"] = str(Path(tmp) / "cache")
        data_dir = synth.generate(Path(tmp) / "data", synth_config, progress=False)
        config = DataConfig(data_dir=data_dir, image_size=args.image_size)
        started = time.perf_counter()
        data = prepare_data(config, progress=False)
        first = time.perf_counter() - started
        started = time.perf_counter()
        prepare_data(config, progress=False)
        cached = time.perf_counter() - started

        module = InspectionDataModule(data, config)
        started = time.perf_counter()
        batches = list(module.train_dataloader())
        loader = time.perf_counter() - started
        net = build_model(ModelConfig(), data.preprocess.channels)
        net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.parameters())
        loss_fn = nn.BCEWithLogitsLoss()
        precision = trainer_precision(TrainConfig(accelerator="cpu"))
        bf16 = precision == "bf16-mixed"
        started = time.perf_counter()
        for images, labels in batches:
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(images.contiguous(memory_format=torch.channels_last))
            loss_fn(logits.float(), labels).backward()
            optimizer.step()
        steps = time.perf_counter() - started
    n = len(data.frame)
    n_train = sum(len(b[1]) for b in batches)
    print(
        f"{n} images of {synth_config.image_size} px -> {args.image_size} px; cpus {os.cpu_count()}"
    )
    print(f"{'stage':<46}{'seconds':>9}{'images/s':>10}")
    print(f"{'prepare, first time (decode + preprocess)':<46}{first:>9.2f}{n / first:>10.0f}")
    print(f"{'prepare again (from the cache)':<46}{cached:>9.2f}{n / cached:>10.0f}")
    print(f"{'one epoch of the training loader alone':<46}{loader:>9.2f}{n_train / loader:>10.0f}")
    print(
        f"{'one epoch of training steps (same batches)':<46}{steps:>9.2f}{n_train / steps:>10.0f}"
        f"  ({precision})"
    )
    print(f"loader share of a training epoch: {loader / (loader + steps):.0%}")


if __name__ == "__main__":
    main()
