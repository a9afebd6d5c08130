"""Inference cost of the served model next to a raw torch forward pass of the same network.

    python benchmarks/inference.py                 # default CNN at 128 px, batch 64
    python benchmarks/inference.py --model models:/quality-inspector@champion
    python benchmarks/inference.py --quick         # smoke run (used by the tests)

Rows:
  raw torch forward        preprocessed uint8 tensors straight into the network (the floor)
  pyfunc, uint8 arrays     mlflow.pyfunc model on a DataFrame of decoded arrays
  pyfunc, encoded PNG      the same on PNG bytes, as a REST client sends them (adds decoding)
and single-image latency (p50/p95) for the raw forward and for the pyfunc on PNG bytes,
then requests/s of `mlflow models serve` (one worker) from one local client.
Without --model, a default CNN (untrained: speed does not depend on the weights) is logged
to a temporary store first.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from _common import benchmark_args

from qi.config import ModelConfig
from qi.data.preprocessing import PreprocessConfig
from qi.data.synth import render_casting
from qi.inference import ModelSpec, prepare_batch
from qi.models import build_model
from qi.serving import as_model_input, encode_png, log_inspection_model


def timed(func, repeats: int) -> list[float]:
    func()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return times


def logged_default_model(image_size: int, store: Path) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    spec = ModelSpec(model=ModelConfig(), preprocess=PreprocessConfig(image_size=image_size))
    net = build_model(spec.model, spec.preprocess.channels)
    example = render_casting(image_size, seed=0, defect_type=None)[:, :, None]
    experiment = mlflow.create_experiment("bench", artifact_location=str(store / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        return log_inspection_model(net.eval(), spec, example).model_uri


def serve_requests_per_second(uri: str, png: bytes, seconds: float) -> tuple[float, float]:
    """Start ``mlflow models serve`` on a free loopback port; single-image requests from one
    local client for ``seconds``; returns (requests/s, median latency in ms)."""
    import base64
    import json
    import urllib.request

    from qi.services import model_server

    with model_server(uri, env={"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri()}) as url:
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        ).encode()
        request = urllib.request.Request(
            f"{url}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        latencies = []
        end = time.monotonic() + seconds
        while time.monotonic() < end or len(latencies) < 5:
            started = time.perf_counter()
            urllib.request.urlopen(request, timeout=30).read()
            latencies.append(time.perf_counter() - started)
        return len(latencies) / sum(latencies), statistics.median(latencies) * 1000


def main() -> None:
    # --model: a model URI (default: a default CNN in a temp store); --image-size: of the
    # source images
    args = benchmark_args(
        __doc__,
        quick={"batch_size": 8, "repeats": 2, "image_size": 48},
        model="",
        batch_size=64,
        image_size=128,
        repeats=10,
    )

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model or logged_default_model(args.image_size, Path(tmp))
        pyfunc = mlflow.pyfunc.load_model(uri)
        inner = pyfunc.unwrap_python_model()
        net, spec = inner.net, inner.spec
        images = [
            render_casting(args.image_size, seed=i, defect_type=None)
            for i in range(args.batch_size)
        ]
        arrays = as_model_input(np.stack(images))
        encoded = pd.DataFrame({"image": [encode_png(image) for image in images]})
        tensor = torch.from_numpy(prepare_batch(list(np.stack(images)), spec.preprocess))
        tensor = tensor.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

        def raw(batch=tensor):
            with torch.inference_mode():
                torch.sigmoid(net(batch))

        rows = []
        n = args.batch_size
        for name, func in (
            ("raw torch forward", raw),
            ("pyfunc, uint8 arrays", lambda: pyfunc.predict(arrays)),
            ("pyfunc, encoded PNG", lambda: pyfunc.predict(encoded)),
        ):
            best = min(timed(func, args.repeats))
            rows.append((name, n / best))
        single_raw = timed(lambda: raw(tensor[:1]), args.repeats * 5)
        single_png = timed(lambda: pyfunc.predict(encoded.iloc[:1]), args.repeats * 5)
        serve_rate, serve_ms = serve_requests_per_second(
            uri, encoded["image"][0], 2.0 if args.quick else 15.0
        )

    print(
        f"model: {uri if args.model else 'default CNN (untrained)'}; source images "
        f"{args.image_size} px -> {spec.preprocess.image_size} px {spec.preprocess.color_mode}; "
        f"batch {n}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}"
    )
    print(f"{'path':<24}{'images/s':>10}{'vs raw':>9}")
    for name, rate in rows:
        print(f"{name:<24}{rate:>10.0f}{rate / rows[0][1]:>9.0%}")
    print(f"{'single image':<24}{'p50 ms':>10}{'p95 ms':>9}")
    for name, times in (("raw torch forward", single_raw), ("pyfunc, encoded PNG", single_png)):
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"{name:<24}{statistics.median(times) * 1000:>10.2f}{p95 * 1000:>9.2f}")
    print(
        f"mlflow models serve, one local client, single-image requests: {serve_rate:.0f} "
        f"requests/s, median {serve_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
