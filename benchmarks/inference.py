"""Inference cost of the served model next to a raw torch forward pass of the same network.

    python benchmarks/inference.py                 # default CNN at 128 px, batch 64
    python benchmarks/inference.py --model models:/quality-inspector@champion
    python benchmarks/inference.py --quick         # smoke run (used by the tests)

    python benchmarks/inference.py --network efficientnet_lite0 --image-size 224

Rows:
  raw torch forward        preprocessed uint8 tensors straight into the network (the floor)
  ONNX Runtime             the same pixels through the `qi export` graph (CPU provider)
  pyfunc, uint8 arrays     mlflow.pyfunc model on a batch array of decoded images
  pyfunc, encoded PNG      the same on PNG bytes, as a REST client sends them (adds decoding)
  ORT + score_onnx.py, PNG the export's qi-free reference preprocessing, then ONNX Runtime
and single-image latency (p50/p95) for each, the ONNX graph's largest score difference from
torch, Grad-CAM cost per image (what `params={"explain": true}` adds), then requests/s of
`mlflow models serve` (one worker) from one local client.
Without --model, a default network (untrained: speed does not depend on the weights) is
logged to a temporary store first.
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
from qi.heatmaps import heatmaps
from qi.inference import ModelSpec, prepare_batch
from qi.models import build_model
from qi.serving import encode_png, log_inspection_model


def timed(func, repeats: int) -> list[float]:
    func()  # warm-up: first calls allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return times


def logged_default_model(image_size: int, store: Path, network: str) -> str:
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    spec = ModelSpec(
        model=ModelConfig(name=network), preprocess=PreprocessConfig(image_size=image_size)
    )
    net = build_model(spec.model, spec.preprocess.channels, image_size)
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
        network="cnn",
        batch_size=64,
        image_size=128,
        repeats=10,
    )

    with tempfile.TemporaryDirectory() as tmp:
        uri = args.model or logged_default_model(args.image_size, Path(tmp), args.network)
        pyfunc = mlflow.pyfunc.load_model(uri)
        inner = pyfunc.unwrap_python_model()
        net, spec = inner.net, inner.spec
        images = [
            render_casting(args.image_size, seed=i, defect_type=None)
            for i in range(args.batch_size)
        ]
        batch = np.stack(images)
        encoded = pd.DataFrame({"image": [encode_png(image) for image in images]})
        pixels = prepare_batch(list(batch), spec.preprocess)
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2)
        tensor = tensor.contiguous(memory_format=torch.channels_last)
        session, script, settings = onnx_session(net, spec, uri, Path(tmp))
        png_files = []
        for i, data in enumerate(encoded["image"]):
            png_files.append(Path(tmp) / f"{i}.png")
            png_files[-1].write_bytes(data)

        def raw(chunk=tensor):
            with torch.inference_mode():
                return net.probabilities(chunk)

        def ort(chunk=pixels):
            return session.run(None, {"image": chunk})[0]

        def ort_files(files=png_files):
            return ort(np.stack([script.load(str(f), settings) for f in files]))

        difference = float(np.abs(ort() - raw().numpy()).max())
        paths = (
            ("raw torch forward", raw, lambda: raw(tensor[:1])),
            ("ONNX Runtime", ort, lambda: ort(pixels[:1])),
            ("pyfunc, uint8 arrays", lambda: pyfunc.predict(batch),
             lambda: pyfunc.predict(batch[0])),
            ("pyfunc, encoded PNG", lambda: pyfunc.predict(encoded),
             lambda: pyfunc.predict(encoded.iloc[:1])),
            ("ORT + score_onnx.py, PNG", ort_files, lambda: ort_files(png_files[:1])),
        )  # fmt: skip
        n = args.batch_size
        rows, singles = [], []
        for name, whole, single in paths:
            rows.append((name, n / min(timed(whole, args.repeats))))
            singles.append((name, timed(single, args.repeats * 5)))
        explain = min(timed(lambda: heatmaps(net, pixels[:8]), max(1, args.repeats // 3))) / 8
        serve_rate, serve_ms = serve_requests_per_second(
            uri, encoded["image"][0], 2.0 if args.quick else 15.0
        )

    described = uri if args.model else f"default {args.network} (untrained)"
    print(
        f"model: {described}; source images {args.image_size} px -> "
        f"{spec.preprocess.image_size} px {spec.preprocess.color_mode}; test-time views "
        f"{net.test_time_views}; batch {n}; torch threads {torch.get_num_threads()}; "
        f"cpus {os.cpu_count()}"
    )
    print(f"{'path':<26}{'images/s':>10}{'vs raw':>9}")
    for name, rate in rows:
        print(f"{name:<26}{rate:>10.0f}{rate / rows[0][1]:>9.0%}")
    print(f"{'single image':<26}{'p50 ms':>10}{'p95 ms':>9}")
    for name, times in singles:
        ordered = sorted(times)
        p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"{name:<26}{statistics.median(times) * 1000:>10.2f}{p95 * 1000:>9.2f}")
    torch_p50, ort_p50 = (statistics.median(t) for _, t in singles[:2])
    print(
        f"ONNX Runtime vs torch, single image: {torch_p50 / ort_p50:.2f}x; largest score "
        f"difference {difference:.1e}"
    )
    print(f"Grad-CAM heatmap: {explain * 1000:.1f} ms per image (batches of 8)")
    print(
        f"mlflow models serve, one local client, single-image requests: {serve_rate:.0f} "
        f"requests/s, median {serve_ms:.1f} ms"
    )


def onnx_session(net, spec, uri: str, folder: Path):
    """The `qi export` graph of this network, its ONNX Runtime session and the reference
    script with the settings it reads from the graph's metadata."""
    import shutil

    import onnxruntime

    import qi.export

    qi.export.write_onnx(net, spec, folder / qi.export.MODEL_FILE, uri)
    shutil.copyfile(
        Path(qi.export.__file__).with_name("onnx_reference.py"), folder / qi.export.SCRIPT_FILE
    )
    session = onnxruntime.InferenceSession(
        str(folder / qi.export.MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    script = qi.export.reference_script(folder)
    return session, script, script.settings(session)


if __name__ == "__main__":
    main()
