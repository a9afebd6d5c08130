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

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from qi.config import ModelConfig
from qi.data.preprocessing import PreprocessConfig
from qi.data.synth import render_casting
from qi.models import build_model
from qi.serving import ModelSpec, as_model_input, encode_png, log_inspection_model, prepare_batch


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
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            uri,
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
            # the server starts uvicorn by name: the interpreter's own bin folder goes first
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mlflow models serve did not start") from None
                time.sleep(0.3)
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(png).decode()]]}}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
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
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)


def main() -> None:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model URI (default: a default CNN in a temp store)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=128, help="source image size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.repeats, args.image_size = 8, 2, 48

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
