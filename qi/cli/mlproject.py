"""``MLproject``, written from the commands' declared options: ``python -m qi.cli.mlproject``.

Each entry point runs its ``qi`` command with every option that the command declares for
MLproject (tracking options are ``mlflow run``'s own, and on/off flags can't take a value), under
the option's name in snake_case and with the option's default; ``main`` is ``tune``. A test
checks that the committed file is what this writes.
"""

from __future__ import annotations

import sys

from qi.cli.config_options import ExposedOption

HEADER = """\
# Written by `python -m qi.cli.mlproject > MLproject` from the options declared in qi/config.py;
# tests/cli/test_mlproject.py checks that it is up to date. Do not edit by hand.
#
# `mlflow run . --env-manager local` uses the current Python environment (pip install -e .);
# without --env-manager local, MLflow builds conda.yaml with conda.
# Parameter names are the CLI's option names in snake_case. Numbers are typed float (MLproject
# has no integer type); qi accepts "15" and "15.0" alike. "" means "not set".
name: qi

conda_env: conda.yaml

entry_points:
"""

# entry point -> (qi command, comment)
ENTRY_POINTS = {
    "main": ("tune", "the main job: an Optuna study on the embedded data (or data_dir)"),
    "tune": ("tune", "the same study, under its own name"),
    "train": ("train", "one training run with qi train's defaults"),
}


def mlproject_parameters(command_name: str) -> list[ExposedOption]:
    from qi.cli import cli

    command = cli.commands[command_name]
    options: list[ExposedOption] = command.callback.__qi_options__
    return [o for o in options if o.declaration.mlproject and not o.is_flag]


def _render_default(option: ExposedOption) -> tuple[str, str]:
    """(MLproject type, default) of an option."""
    default = option.default
    if option.kind.base in (int, float) and default is not None:
        return "float", f"{default:g}" if isinstance(default, float) else str(default)
    if default is None or default == ():
        return "string", '""'
    if isinstance(default, tuple):  # quoted: YAML reads 8,16 as the number 816
        return "string", '"' + ",".join(str(v) for v in default) + '"'
    return "string", str(default)


def render_mlproject() -> str:
    lines = [HEADER.rstrip("\n")]
    for entry, (command, comment) in ENTRY_POINTS.items():
        params = mlproject_parameters(command)
        lines += [f"  # {comment}", f"  {entry}:", "    parameters:"]
        for option in params:
            kind, default = _render_default(option)
            lines.append(f"      {option.param}: {{type: {kind}, default: {default}}}")
        words = [f"qi {command} --no-progress"]
        words += [f"{option.flags[0]} {{{option.param}}}" for option in params]
        lines.append("    command: >-")
        lines += _wrap(words, indent="      ", width=96)
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _wrap(words: list[str], indent: str, width: int) -> list[str]:
    out, line = [], indent
    for word in words:
        if len(line) + len(word) + 1 > width and line.strip():
            out.append(line.rstrip())
            line = indent
        line += word + " "
    out.append(line.rstrip())
    return out


def main() -> None:
    sys.stdout.write(render_mlproject())


if __name__ == "__main__":
    main()

__all__ = ["mlproject_parameters", "render_mlproject"]
