"""The model as production uses it: registry -> pyfunc in a fresh process, REST, batch CLI."""

import base64
import json
import os
import subprocess
import sys
import urllib.request
from dataclasses import replace
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qi.cli import cli
from qi.inference import defect_probabilities, prepare_batch
from qi.registry import promote, register
from qi.services import answers, free_port, interpreter_env, start, stop, wait_until
from qi.serving import as_model_input
from qi.train import train

PROJECT = Path(__file__).resolve().parent.parent


@pytest.fixture
def champion(tiny_config):
    """A trained model registered as quality-inspector@champion in this test's store."""
    outcome = train(
        replace(tiny_config, train=replace(tiny_config.train, epochs=2)), progress=False
    )
    version = register(outcome.model_uri, "quality-inspector", tags={}, description="test")
    promote("quality-inspector", str(version.version), outcome.data.split_frame("test"))
    return outcome


def _test_images(outcome, n=4):
    return outcome.data.split_frame("test")["image_path"].tolist()[:n]


@pytest.mark.slow
def test_registered_model_in_a_fresh_process(champion):
    paths = _test_images(champion)
    script = f"""
import json, sys
import cv2, mlflow, numpy as np, pandas as pd
from qi.serving import as_model_input
from qi.services import answers, free_port, interpreter_env, start, stop, wait_until
model = mlflow.pyfunc.load_model("models:/quality-inspector@champion")
paths = {paths!r}
encoded = pd.DataFrame({{"image": [open(p, "rb").read() for p in paths]}})
gray = np.stack([cv2.imread(p, cv2.IMREAD_GRAYSCALE) for p in paths])
rgb = [cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB) for p in paths]
out = {{name: model.predict(data).to_dict("list") for name, data in
       (("bytes", encoded), ("array", as_model_input(gray)), ("list", as_model_input(rgb)))}}
json.dump(out, sys.stdout)
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
    for name in ("bytes", "array", "list"):
        assert results[name]["defect_probability"] == pytest.approx(expected, abs=1e-5), name
        assert set(results[name]["label"]) <= {"ok", "defective"}
        assert len(set(results[name]["threshold"])) == 1


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


def _dockerfile_command(name: str) -> str:
    """The shell command of a Dockerfile's exec-form CMD ["sh", "-c", "..."]."""
    text = (PROJECT / "docker" / name).read_text()
    line = [ln for ln in text.splitlines() if ln.startswith("CMD ")][-1]
    argv = json.loads(line[len("CMD ") :])
    assert argv[:2] == ["sh", "-c"]
    return argv[2]


@pytest.mark.slow
def test_rest_serving_with_the_docker_command(champion):
    port = free_port()
    env = interpreter_env(
        MODEL_URI="models:/quality-inspector@champion", PORT=str(port), WORKERS="1"
    )
    command = _dockerfile_command("serve.Dockerfile").replace("0.0.0.0", "127.0.0.1")
    server = start(["sh", "-c", command], env=env)
    try:
        wait_until(answers(f"http://127.0.0.1:{port}/ping"), "the serve image's command", server)
        paths = _test_images(champion, 2)
        payload = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(Path(p).read_bytes()).decode()] for p in paths],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        predictions = answer["predictions"]
        expected = defect_probabilities(champion.result.net, champion.data.split("test")[0][:2])
        assert [p["defect_probability"] for p in predictions] == pytest.approx(expected, abs=1e-5)
        assert {p["label"] for p in predictions} <= {"ok", "defective"}
    finally:
        stop(server)


def test_tracking_server_command_uses_real_flags():
    command = _dockerfile_command("tracking.Dockerfile")
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
