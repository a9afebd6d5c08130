"""The docs' reference pages, written from the declarations: ``python -m qi.cli.reference``.

``docs/reference/cli.md`` (every command with its arguments and options) and
``docs/reference/search-space.md`` (every field a ``--search-space`` file may set) are made
from the same click commands and :mod:`qi.config` declarations that ``qi --help`` and
``MLproject`` are made from, so they cannot drift: ``--check`` (run by the tests and CI) fails
while a committed page differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from qi.cli.config_options import ExposedOption
from qi.options import declaration_of

PAGES_DIR = Path("docs") / "reference"

NOTICE = (
    "<!-- Written by `python -m qi.cli.reference` from the options declared in qi/config.py and"
    " the commands in qi/cli/; tests/cli/test_reference.py checks that it is up to date. Do"
    " not edit by hand. -->"
)


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _default_text(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        if param.secondary_opts:
            return param.opts[0] if param.default else param.secondary_opts[0]
        return "off" if not param.default else "on"
    default = param.default
    if default is None or default == () or callable(default):
        return ""
    return _code(str(default))


def _choices_text(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return ", ".join(_code(c) for c in kind.choices)
    exposed: ExposedOption | None = getattr(kind, "exposed", None)
    if exposed is None:
        return ""
    names = exposed.declaration.shown_choices() or exposed.kind.literal
    return ", ".join(_code(n) for n in names) if names else ""


def _commands(group: click.Group, prefix: str) -> list[tuple[str, click.Command]]:
    found: list[tuple[str, click.Command]] = []
    for name in sorted(group.commands):
        command = group.commands[name]
        path = f"{prefix} {name}"
        if isinstance(command, click.Group):
            found += _commands(command, path)
        else:
            found.append((path, command))
    return found


def _mlproject_names(command: click.Command) -> dict[str, str]:
    from qi.cli.mlproject import ENTRY_POINTS, mlproject_parameters

    name = command.name
    if not any(qi_command == name for qi_command, _ in ENTRY_POINTS.values()):
        return {}
    try:
        return {o.param: o.param for o in mlproject_parameters(name)}
    except KeyError:
        return {}


def _environment_variable(path: str, param: click.Parameter) -> str:
    words = path.split()[1:]  # "qi study status" -> QI_STUDY_STATUS_...
    return "_".join(["QI", *(w.upper() for w in words), param.name.upper()])


def render_cli() -> str:
    from qi.cli import cli

    lines = [
        NOTICE,
        "",
        "# Command-line reference",
        "",
        "Every option can also be given as an environment variable, "
        "`QI_<COMMAND>_<OPTION>` (e.g. `QI_TUNE_N_TRIALS=40`); a command-line value wins. "
        "Options marked with an MLproject name are parameters of the `MLproject` entry points "
        "that run the command (`mlflow run . -e tune -P n_trials=40`). "
        "`qi --verbose` (`-v`, `-vv`) logs more; `qi --version` prints the version.",
        "",
    ]
    for path, command in _commands(cli, "qi"):
        mlproject = _mlproject_names(command)
        arguments = [p for p in command.params if isinstance(p, click.Argument)]
        options = [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]
        usage = " ".join([path, "[OPTIONS]", *(a.human_readable_name for a in arguments)])
        lines += [f"## `{path}`", "", f"```text\n{usage}\n```", ""]
        help_text = (command.help or "").strip()
        if help_text:
            lines += [" ".join(help_text.split()), ""]
        if arguments:
            names = ", ".join(_code(a.human_readable_name) for a in arguments)
            lines += [f"Arguments: {names} (see the usage line above).", ""]
        if not options:
            continue
        lines += [
            "| option | meaning | default | choices | MLproject | environment |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for option in options:
            flags = ", ".join(_code(f) for f in (*option.opts, *option.secondary_opts))
            row = [
                flags,
                _cell(option.help or ""),
                _cell(_default_text(option)),
                _cell(_choices_text(option)),
                _code(mlproject.get(option.name, "")),
                _code(_environment_variable(path, option)),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def render_search_space() -> str:
    from qi.config import SearchSpace

    lines = [
        NOTICE,
        "",
        "# Search-space reference",
        "",
        " ".join((SearchSpace.__doc__ or "").split()),
        "",
        "A `--search-space` file is a JSON object with any of these keys; the others keep "
        "their defaults. Ranges are `[low, high]`; lists of names or sizes are the choices.",
        "",
        "| key | default | meaning | allowed names |",
        "| --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(SearchSpace):
        declaration = declaration_of(f)
        if declaration is None:
            continue
        default = f.default
        shown = "[" + ", ".join(_json_item(v) for v in default) + "]"
        names = declaration.shown_choices() or ()
        row = [
            _code(f.name),
            _code(shown),
            _cell(declaration.help),
            _cell(", ".join(_code(n) for n in names)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _json_item(value: object) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return f"{value:g}" if isinstance(value, float) else str(value)


PAGES = {"cli.md": render_cli, "search-space.md": render_search_space}


def stale_pages(root: Path) -> list[Path]:
    """The committed reference pages under ``root`` that differ from what this writes."""
    return [
        root / PAGES_DIR / name
        for name, render in PAGES.items()
        if not (root / PAGES_DIR / name).is_file()
        or (root / PAGES_DIR / name).read_text() != render()
    ]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    root = Path.cwd()
    if "--check" in argv:
        stale = stale_pages(root)
        for page in stale:
            sys.stderr.write(f"{page} is stale: run `python -m qi.cli.reference`\n")
        return 1 if stale else 0
    (root / PAGES_DIR).mkdir(parents=True, exist_ok=True)
    for name, render in PAGES.items():
        (root / PAGES_DIR / name).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["render_cli", "render_search_space", "stale_pages"]
