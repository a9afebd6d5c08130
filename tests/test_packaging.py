"""What ships: the environment files agree, the served model asks only for what it imports,
imports point down, and the command line starts without the training stack."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_conda_environment_lists_exactly_the_project_dependencies():
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip[-1] == "-e ."
    assert pip[:-1] == _pyproject()["project"]["dependencies"]


def test_served_model_requires_timm_not_the_former_architecture_package():
    from qi.serving import pip_requirements

    served = {_name(r) for r in pip_requirements()}
    core = {_name(r) for r in _pyproject()["project"]["dependencies"]}
    assert "timm" in served and "timm" in core
    assert "efficientnet-lite-pytorch" not in served | core
    # everything a served model asks for is something qi itself installs
    assert served - {"mlflow-skinny"} <= core | {"pillow"}


def test_the_serving_image_can_still_serve_models_registered_before_timm():
    """Those models carry their own code, which builds EfficientNet-Lite with the former
    package: the image installs it (the ``legacy`` extra) so that they keep serving."""
    legacy = _pyproject()["project"]["optional-dependencies"]["legacy"]
    assert [_name(r) for r in legacy] == ["efficientnet-lite-pytorch"]
    dockerfile = (ROOT / "docker/serve.Dockerfile").read_text()
    assert 'pip install --no-cache-dir ".[legacy]"' in dockerfile


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_every_import_points_down():
    result = subprocess.run(
        ["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_the_command_line_and_configs_load_no_training_stack():
    heavy = ("lightning", "mlflow", "optuna", "torch", "timm")
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from qi.cli import cli\n"
        "from qi.config import RunConfig, TrainConfig, TuneConfig\n"
        "RunConfig(); TrainConfig(); TuneConfig()\n"
        "for args in (['--help'], ['train', '--help'], ['tune', '--help']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0, args\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
