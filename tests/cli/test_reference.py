"""The docs' reference pages are written from the declarations, and the site builds strictly."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qi.cli import cli
from qi.cli.reference import main, render_cli, render_search_space, stale_pages
from qi.config import SearchSpace

PROJECT = Path(__file__).resolve().parents[2]


def test_reference_pages_are_up_to_date():
    stale = stale_pages(PROJECT)
    assert not stale, f"stale: {[str(p) for p in stale]}; run: python -m qi.cli.reference"


def test_every_command_and_option_is_on_the_cli_page():
    page = render_cli()
    for name, command in cli.commands.items():
        commands = command.commands.items() if hasattr(command, "commands") else [(None, command)]
        for sub, leaf in commands:
            path = " ".join(p for p in ("qi", name, sub) if p)
            assert f"## `{path}`" in page, path
            section = page.split(f"## `{path}`", 1)[1].split("\n## ", 1)[0]
            for param in leaf.params:
                if param.param_type_name == "option" and param.name != "help":
                    assert f"`{param.opts[0]}`" in section, (path, param.opts[0])


def test_cli_page_names_mlproject_parameters_and_environment_variables():
    section = render_cli().split("## `qi tune`", 1)[1]
    row = next(line for line in section.splitlines() if line.startswith("| `--n-trials`"))
    assert "`n_trials`" in row and "`QI_TUNE_N_TRIALS`" in row and "`20`" in row


def test_search_space_page_lists_every_field_with_its_default():
    page = render_search_space()
    space = SearchSpace()
    assert '| `feature_stages` | `["none"]` |' in page
    assert f"`[{space.batch_sizes[0]}, " in page
    for field in SearchSpace.__dataclass_fields__:
        assert f"| `{field}` |" in page, field


def test_check_reports_a_stale_page(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0  # writes the pages
    assert main(["--check"]) == 0
    page = tmp_path / "docs" / "reference" / "cli.md"
    page.write_text(page.read_text() + "edited by hand\n")
    assert main(["--check"]) == 1
    assert "cli.md is stale: run `python -m qi.cli.reference`" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("sphinx-build") is None, reason="sphinx not installed")
def test_docs_build_strictly(tmp_path):
    """A broken link or anchor, or a page outside the table of contents, fails (as in CI)."""
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "docs", str(out)],
        cwd=PROJECT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "reference" / "cli.html").is_file()
