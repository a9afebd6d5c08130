"""MLproject is written from the declared options and says what the commands say."""

from pathlib import Path

import yaml

from qi.cli import cli
from qi.cli.mlproject import mlproject_parameters, render_mlproject
from qi.options import from_text

PROJECT = Path(__file__).resolve().parents[2]


def test_mlproject_is_up_to_date():
    committed = (PROJECT / "MLproject").read_text()
    assert committed == render_mlproject(), "run: python -m qi.cli.mlproject > MLproject"


def test_every_parameter_is_an_option_of_its_command_with_its_default():
    project = yaml.safe_load((PROJECT / "MLproject").read_text())
    entry_points = project["entry_points"]
    assert entry_points["main"] == entry_points["tune"]
    for entry, command in (("main", "tune"), ("tune", "tune"), ("train", "train")):
        params = entry_points[entry]["parameters"]
        options = {o.param: o for o in mlproject_parameters(command)}
        assert set(params) == set(options), entry
        click_params = {p.name: p for p in cli.commands[command].params}
        for name, spec in params.items():
            option = options[name]
            assert f"{option.flags[0]} {{{name}}}" in entry_points[entry]["command"]
            default = from_text(str(spec["default"]), option.kind, option.declaration)
            expected = click_params[name].default
            if isinstance(option.default, tuple):
                expected = option.default or None
            unset = ("", None, ())
            assert default == expected or (default in unset and expected in unset), name
