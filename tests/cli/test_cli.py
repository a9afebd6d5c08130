import mlflow
from click.testing import CliRunner

import qi
from qi.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_version_and_help():
    assert qi.__version__ in invoke("--version").output
    for command in (["--help"], ["train", "--help"], ["data", "synth", "--help"]):
        result = invoke(*command)
        assert result.exit_code == 0 and "Usage" in result.output
    assert "--ok-class" in invoke("train", "--help").output


def test_data_synth_writes_the_set(tmp_path):
    result = invoke(
        "data",
        "synth",
        str(tmp_path / "out"),
        "--n-train",
        "6",
        "--n-test",
        "4",
        "--image-size",
        "32",
    )
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").rglob("*.png"))) == 10
    again = invoke("data", "synth", str(tmp_path / "out"), "--n-train", "6")
    assert again.exit_code == 1 and "not empty" in again.output


def test_bad_options_are_one_line_errors(tmp_path):
    result = invoke("train", "--epochs", "0")
    assert result.exit_code == 2 and "must be positive" in result.output
    result = invoke("train", "--model", "vgg99")
    assert result.exit_code == 2 and "resnet18" in result.output
    for command in ("train", "tune", "evaluate --model m", "promote --version 1"):
        result = invoke(*command.split(), "--data-dir", str(tmp_path / "missing"))
        assert result.exit_code == 2, command
        assert "does not exist: check the path" in result.output.strip().splitlines()[-1]
        assert "Traceback" not in result.output
    result = invoke("tune", "--metric", "val/bogus")
    assert result.exit_code == 2 and "unknown metric 'val/bogus'" in result.output
    result = invoke("tune", "--models", "cnn,vgg99")
    assert result.exit_code == 2 and "vgg99" in result.output
    result = invoke("tune", "--n-trials", "-3")
    assert result.exit_code == 2 and "must be positive" in result.output
    result = invoke("train", "--tracking-uri", "http://127.0.0.1:9", "--epochs", "1")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "tracking store http://127.0.0.1:9 is not usable" in result.output.splitlines()[-1]


def test_mlproject_style_values_are_accepted(tiny_casting):
    # MLproject renders numbers as floats and unset strings as ''
    result = invoke(
        "train",
        "--data-dir",
        str(tiny_casting),
        "--ok-class",
        "",
        "--epochs",
        "1.0",
        "--image-size",
        "32",
        "--max-images",
        "",
        "--width",
        "8",
        "--depth",
        "3",
        "--experiment",
        "cli",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output
    assert "test at threshold" in result.output
    runs = mlflow.search_runs(experiment_names=["cli"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
