"""The model as production uses it: registry -> pyfunc in a fresh process, REST, batch CLI."""

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.inference import defect_probabilities, prepare_batch
from qi.services import (
    answers,
    dockerfile_command,
    free_port,
    interpreter_env,
    start,
    stop,
    wait_until,
)
from qi.serving import as_model_input

PROJECT = Path(__file__).resolve().parent.parent


def _test_images(outcome, n=4):
    return outcome.data.split_frame("test")["image_path"].tolist()[:n]


@pytest.mark.slow
def test_registered_model_in_a_fresh_process_takes_every_natural_input(champion):
    """The calls of the MLflow docs, with no qi helper: batch arrays, one array, lists of
    arrays of any size or of encoded bytes, a DataFrame; then the bad inputs by name."""
    paths = _test_images(champion)
    script = f"""
import json, sys, zlib
import cv2, mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model("models:/quality-inspector@champion")
paths = {paths!r}
raw = [open(p, "rb").read() for p in paths]
gray = np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths])
rgb = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
forms = {{
    "uint8 batch (N, H, W)": gray,
    "uint8 batch (N, H, W, 3)": np.stack(rgb),
    "uint16 batch": gray.astype(np.uint16) * 257,
    "one image": gray[0],
    "list of arrays, other sizes": [cv2.resize(a, (60 + 7 * i, 50)) for i, a in enumerate(rgb)],
    "list of bytes": raw,
    "DataFrame": pd.DataFrame({{"image": raw}}),
}}
out = {{name: model.predict(data).to_dict("list") for name, data in forms.items()}}
errors = {{}}
bomb = cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes()
ihdr = bomb[12:16] + (40000).to_bytes(4, "big") * 2 + bomb[24:29]
bomb = bomb[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + bomb[33:]
for name, data in (("float", np.zeros((2, 8, 8))), ("5-D", np.zeros((1, 2, 8, 8, 1), np.uint8)),
                   ("empty", np.zeros((0, 8, 8), np.uint8)), ("empty list", []),
                   ("bomb", [raw[0], bomb])):
    try:
        model.predict(data)
        errors[name] = "accepted"
    except Exception as exc:
        errors[name] = str(exc)
json.dump({{"out": out, "errors": errors}}, sys.stdout)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    expected = defect_probabilities(champion.result.net, champion.data.split("test")[0][:4])
    for name, answer in results["out"].items():
        n = 1 if name == "one image" else 4
        assert len(answer["label"]) == n, name
        assert set(answer["label"]) <= {"ok", "defective"}, name
        if name != "list of arrays, other sizes":  # resized: other pixels, other scores
            assert answer["defect_probability"] == pytest.approx(expected[:n], abs=1e-4), name
    errors = results["errors"]
    assert "float64 array" in errors["float"] and "row 0" in errors["float"]
    assert "5-D array" in errors["5-D"]
    assert "empty batch" in errors["empty"] and "empty batch" in errors["empty list"]
    assert "row 1: image of 1600000000 pixels is over" in errors["bomb"]
    for message in errors.values():
        assert "\n" not in message.strip(), message  # one line


def test_bad_inputs_name_the_row(champion):
    model = mlflow.pyfunc.load_model(champion.model_uri)
    good = Path(_test_images(champion, 1)[0]).read_bytes()
    cases = [  # (cells, message, the row it must name)
        ([good, b"garbage"], "not a decodable", 1),
        ([good, good, b""], "0 bytes", 2),
        ([np.zeros((8, 8)), good], "float64 array", 0),
        ([good, np.zeros((0, 4), np.uint8)], "zero-sized", 1),
    ]
    for items, message, row in cases:
        with pytest.raises(Exception, match=message) as info:
            model.predict(pd.DataFrame({"image": items}))
        assert f"row {row}:" in str(info.value), str(info.value)
    with pytest.raises(Exception, match="image"):
        model.predict(pd.DataFrame({"picture": [good]}))
    with pytest.raises(ValueError, match="float64"):
        prepare_batch([np.zeros((4, 4))], champion.data.preprocess)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        as_model_input(np.zeros((4, 4), np.uint8))


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_rest_serving_with_the_docker_command(champion):
    """The serve image's `mlflow models serve` answers every JSON form clients send, and a bad
    request gets HTTP 400 whose message names the row, with no stack trace or server path."""
    port = free_port()
    env = interpreter_env(
        MODEL_URI="models:/quality-inspector@champion", PORT=str(port), WORKERS="1"
    )
    command = dockerfile_command("serve.Dockerfile").replace("0.0.0.0", "127.0.0.1")
    server = start(["sh", "-c", command], env=env)
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        wait_until(answers(f"http://127.0.0.1:{port}/ping"), "the serve image's command", server)
        paths = _test_images(champion, 2)
        b64 = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths]
        forms = {
            "dataframe_split": {
                "dataframe_split": {"columns": ["image"], "data": [[b] for b in b64]}
            },
            "dataframe_records": {"dataframe_records": [{"image": b} for b in b64]},
            "instances of image objects": {"instances": [{"image": {"b64": b}} for b in b64]},
            "instances of b64 objects": {"instances": [{"b64": b} for b in b64]},
            "inputs": {"inputs": {"image": [{"b64": b} for b in b64]}},
        }
        expected = defect_probabilities(champion.result.net, champion.data.split("test")[0][:2])
        for name, payload in forms.items():
            status, answer = _post(url, payload)
            assert status == 200, (name, answer)
            predictions = answer["predictions"]
            scores = [p["defect_probability"] for p in predictions]
            assert scores == pytest.approx(expected, abs=1e-5), name
            assert {p["label"] for p in predictions} <= {"ok", "defective"}, name
        status, answer = _post(url, {**forms["dataframe_split"], "params": {"explain": True}})
        assert status == 200 and all(p["heatmap"] for p in answer["predictions"]), answer
        bad = {
            "row 1: not a decodable": {"instances": [{"b64": b64[0]}, {"b64": "aGVsbG8="}]},
            "row 0: text that is not base64": {"dataframe_records": [{"image": "no image"}]},
            "needs a column 'image'": {"dataframe_records": [{"picture": b64[0]}]},
            "empty batch": {"instances": []},
        }
        for message, payload in bad.items():
            status, answer = _post(url, payload)
            assert status == 400, (message, status, answer)
            assert message in answer["message"], answer
            assert "\n" not in answer["message"] and "Traceback" not in json.dumps(answer)
            assert "/qi/" not in json.dumps(answer) and "stack_trace" not in answer, answer
    finally:
        stop(server)


def test_tracking_server_command_uses_real_flags():
    command = dockerfile_command("tracking.Dockerfile")
    help_text = subprocess.run(
        [sys.executable, "-m", "mlflow", "server", "--help"], capture_output=True, text=True
    ).stdout
    for flag in (
        "--backend-store-uri",
        "--artifacts-destination",
        "--serve-artifacts",
        "--workers",
        "--host",
        "--port",
    ):
        assert flag in command and flag in help_text, flag


def test_qi_predict_writes_a_csv(champion, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, path in enumerate(_test_images(champion, 5)):
        image = cv2.imread(path)
        cv2.imwrite(str(folder / f"part_{i}.jpg"), image)  # another format and colour
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            "models:/quality-inspector@champion",
            str(folder),
            "-o",
            str(tmp_path / "out.csv"),
            "--batch-size",
            "2",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output and "1 unreadable" in result.output
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert len(table) == 6 and list(table.columns)[:3] == ["file", "label", "defect_probability"]
    broken = table[table["file"].str.endswith("broken.png")].iloc[0]
    assert broken["label"] == "" and "not a decodable" in broken["error"]
    scored = table[table["error"] == ""]
    assert scored["label"].isin(["ok", "defective"]).all() and len(scored) == 5
    missing = CliRunner().invoke(
        cli, ["predict", "--model", "models:/x@champion", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2 and "does not exist" in missing.output
