"""ONNX export with proven parity, and heatmaps: what the line and the inspector get."""

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner

import qi.export
from qi.cli import cli
from qi.export import MODEL_FILE, SCRIPT_FILE, ParityError, export_model
from qi.tags import Artifact, Tag

MODEL = "models:/quality-inspector@champion"


@pytest.mark.slow
def test_export_publishes_a_parity_checked_onnx_model(champion, tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export", "--model", MODEL, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "0 decisions differ" in result.output and "published: runs:/" in result.output
    parity = json.loads((out / "parity.json").read_text())
    test_paths = champion.data.split_frame("test")["image_path"].tolist()
    assert parity["images"] == len(test_paths) and parity["decisions_differ"] == 0
    assert parity["max_abs_difference"] <= 1e-4 and parity["opset"] >= 18

    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("quality-inspector", "champion")
    assert version.tags[Tag.ONNX].endswith(f"{Artifact.ONNX}/{MODEL_FILE}")
    assert "0 decisions differ" in version.tags[Tag.ONNX_PARITY]
    run = client.get_run(version.run_id)
    assert run.data.metrics["onnx_decisions_differ"] == 0
    assert run.data.metrics["onnx_max_abs_difference"] <= 1e-4
    logged = {a.path for a in client.list_artifacts(version.run_id, Artifact.ONNX)}
    assert f"{Artifact.ONNX}/{MODEL_FILE}" in logged and f"{Artifact.ONNX}/{SCRIPT_FILE}" in logged

    # the reference script scores files with neither qi nor torch importable
    files = test_paths[:3]
    blocker = (
        "import runpy, sys; sys.modules['qi'] = None; sys.modules['torch'] = None; "
        f"sys.argv = ['score_onnx.py', {str(out / MODEL_FILE)!r}, *{files!r}]; "
        f"runpy.run_path({str(out / SCRIPT_FILE)!r}, run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split(",") for line in done.stdout.strip().splitlines()]
    served = mlflow.pyfunc.load_model(MODEL).predict(
        pd.DataFrame({"image": [Path(p).read_bytes() for p in files]})
    )
    assert [line[1] for line in lines] == served["label"].tolist()
    assert [float(line[2]) for line in lines] == pytest.approx(
        served["defect_probability"].tolist(), abs=1e-4
    )


@pytest.mark.slow
def test_export_refuses_to_publish_without_parity(champion, tmp_path, monkeypatch):
    """An exporter bug (the graph sees its images flipped) must stop the export."""
    forward = qi.export._PixelsToProbability.forward
    monkeypatch.setattr(
        qi.export._PixelsToProbability,
        "forward",
        lambda self, image: forward(self, image.flip(2)),
    )
    with pytest.raises(ParityError, match="not published"):
        export_model(MODEL, tmp_path / "export")
    version = mlflow.MlflowClient().get_model_version_by_alias("quality-inspector", "champion")
    assert Tag.ONNX not in version.tags
    assert not mlflow.MlflowClient().list_artifacts(version.run_id, Artifact.ONNX)
    parity = json.loads((tmp_path / "export" / "parity.json").read_text())  # kept for a look
    assert parity["max_abs_difference"] > parity["tolerance"] or parity["decisions_differ"] > 0


def test_explain_writes_an_overlay_per_readable_file(champion, tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, path in enumerate(champion.data.split_frame("test")["image_path"][:2]):
        (folder / f"part_{i}.png").write_bytes(Path(path).read_bytes())
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "heatmaps"
    result = CliRunner().invoke(cli, ["explain", "--model", MODEL, str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 overlays" in result.output and "broken.png: unreadable" in result.output
    overlays = sorted(p.name for p in out.glob("*.heatmap.png"))
    assert overlays == ["part_0.heatmap.png", "part_1.heatmap.png"]
    table = pd.read_csv(out / "explained.csv", keep_default_na=False)
    assert len(table) == 3 and set(table["label"]) <= {"", "ok", "defective"}
    assert table.loc[table["label"] == "", "file"].str.endswith("broken.png").all()
    assert (table["label"] == "").sum() == 1
    missing = CliRunner().invoke(cli, ["explain", "--model", MODEL, str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
