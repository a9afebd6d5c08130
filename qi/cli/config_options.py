"""Click options made from the config declarations (:mod:`qi.config`), and back to configs.

A command names the config classes it builds and which of their fields it offers::

    @config_options(run=RunConfig, exclude=("run.synth.*",))
    def train(run: RunConfig, progress: bool): ...

Every declared field becomes one option with the field's default, help, choices and check; a
:class:`~qi.options.SharedOption` (``--seed``) becomes one option that sets each of its fields.
The command function receives the built configs; a value the config refuses is a usage error
(exit code 2), never a traceback.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from qi.options import FieldType, Option, declaration_of, field_type, from_text, missing_path


@dataclass
class ExposedOption:
    """One command-line option and the config fields it sets."""

    param: str  # click's parameter name (and QI_<COMMAND>_<PARAM> environment variable)
    flags: tuple[str, ...]
    declaration: Option
    kind: FieldType
    default: Any
    targets: list[tuple[str, ...]]  # paths of the fields: ("run", "data", "seed")

    @property
    def is_flag(self) -> bool:
        return self.kind.base is bool


class ConfigValue(click.ParamType):
    """Text -> a field's value, checked against its declaration (choices, check, existence)."""

    def __init__(self, exposed: ExposedOption) -> None:
        self.exposed = exposed
        self.name = _type_name(exposed.kind)

    def get_metavar(self, param, ctx) -> str | None:
        names = self.exposed.declaration.shown_choices() or self.exposed.kind.literal
        if names and self.exposed.kind.base is not tuple:
            return f"[{'|'.join(names)}]"
        return None

    def convert(self, value, param, ctx):
        exposed = self.exposed
        try:
            parsed = from_text(value, exposed.kind, exposed.declaration)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        problem = _problem(exposed, parsed)
        if problem:
            self.fail(problem, param, ctx)
        return parsed


def _problem(exposed: ExposedOption, value: Any) -> str | None:
    declaration = exposed.declaration
    if exposed.kind.literal and value is not None and value not in exposed.kind.literal:
        return f"'{value}' is not one of {', '.join(exposed.kind.literal)}"
    problem = declaration.problem(value, exposed.targets[0][-1])
    if problem:
        return problem
    if declaration.must_exist and value is not None:
        return missing_path(Path(value), declaration.must_exist)
    return None


def _type_name(kind: FieldType) -> str:
    if kind.base is tuple and kind.item is dict:
        return "json"
    names = {int: "integer", float: "float", Path: "path", tuple: "list", dict: "json"}
    return names.get(kind.base, "text")


def exposed_options(
    roots: dict[str, type], include: Iterable[str] = ("*",), exclude: Iterable[str] = ()
) -> list[ExposedOption]:
    """The options of the fields of ``roots`` whose dotted path matches ``include`` and not
    ``exclude``, in the order of the first ``include`` pattern each matches (then of the
    fields); fields sharing one declaration become one option."""
    include, exclude = tuple(include), tuple(exclude)
    by_declaration: dict[int, ExposedOption] = {}
    ordered: list[ExposedOption] = []
    for root_name, cls in roots.items():
        for path, owner, f in _declared_fields(cls, (root_name,)):
            dotted = ".".join(path)
            if not any(fnmatch.fnmatch(dotted, p) for p in include):
                continue
            if any(fnmatch.fnmatch(dotted, p) for p in exclude):
                continue
            declaration = declaration_of(f)
            known = by_declaration.get(id(declaration))
            if known is not None:
                known.targets.append(path)
                continue
            flag = declaration.flag or f"--{f.name.replace('_', '-')}"
            exposed = ExposedOption(
                param=flag.lstrip("-").replace("-", "_"),
                flags=(flag, declaration.short) if declaration.short else (flag,),
                declaration=declaration,
                kind=field_type(owner, f.name),
                default=f.default,
                targets=[path],
            )
            by_declaration[id(declaration)] = exposed
            ordered.append(exposed)

    def rank(exposed: ExposedOption) -> int:
        dotted = ".".join(exposed.targets[0])
        return next(i for i, p in enumerate(include) if fnmatch.fnmatch(dotted, p))

    ordered.sort(key=rank)
    params = [o.param for o in ordered]
    duplicated = {p for p in params if params.count(p) > 1}
    if duplicated:
        raise RuntimeError(f"two options named {sorted(duplicated)}: give one a flag")
    return ordered


def _declared_fields(cls: type, prefix: tuple[str, ...]):
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if declaration_of(f) is not None:
            yield path, cls, f
            continue
        kind = field_type(cls, f.name)
        if dataclasses.is_dataclass(kind.base):
            yield from _declared_fields(kind.base, path)


def click_option(exposed: ExposedOption, aliases: tuple[str, ...] = ()) -> Callable:
    declaration = exposed.declaration
    flags = (*exposed.flags, *aliases)
    if exposed.is_flag:
        if declaration.negatable:
            name = flags[0].lstrip("-")
            flags = (f"--{name}/--no-{name}", *flags[1:])
        return click.option(
            *flags,
            exposed.param,
            is_flag=True,
            default=exposed.default,
            show_default=declaration.show_default,
            help=declaration.help or None,
        )
    default = exposed.default
    if isinstance(default, tuple):
        default = ",".join(str(v) for v in default) if default else None
    return click.option(
        *flags,
        exposed.param,
        type=ConfigValue(exposed),
        default=default,
        required=declaration.required,
        show_default=declaration.show_default and default is not None,
        help=declaration.help or None,
    )


def build_configs(
    roots: dict[str, type], options: list[ExposedOption], values: dict[str, Any]
) -> dict[str, Any]:
    """``{root name: config}`` with each option's value put in each of its fields.

    Raises ValueError when a config refuses the combination.
    """
    changes: dict[tuple[str, ...], Any] = {}
    for exposed in options:
        if exposed.param not in values:
            continue
        value = values[exposed.param]
        if exposed.kind.base is tuple and value is None and not exposed.kind.optional:
            value = ()
        for path in exposed.targets:
            changes[path] = value
    return {name: _build(cls, (name,), changes) for name, cls in roots.items()}


def _build(cls: type, prefix: tuple[str, ...], changes: dict[tuple[str, ...], Any]) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if path in changes:
            kwargs[f.name] = changes[path]
            continue
        kind = field_type(cls, f.name)
        if dataclasses.is_dataclass(kind.base) and any(key[: len(path)] == path for key in changes):
            kwargs[f.name] = _build(kind.base, path, changes)
    return cls(**kwargs)


def config_options(
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    **roots: type,
) -> Callable:
    """Decorate a click command with the options of ``roots``' declared fields; the command
    is called with one built config per root (keyword = root name) and its other params."""
    options = exposed_options(roots, include, exclude)
    aliases = aliases or {}

    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def wrapper(**values: Any) -> Any:
            own = {o.param for o in options}
            try:
                configs = build_configs(roots, options, values)
            except ValueError as exc:
                raise click.UsageError(str(exc)) from exc
            rest = {k: v for k, v in values.items() if k not in own}
            return func(**configs, **rest)

        for exposed in reversed(options):
            wrapper = click_option(exposed, aliases.get(".".join(exposed.targets[0]), ()))(wrapper)
        wrapper.__qi_options__ = options  # for MLproject and the tests
        wrapper.__qi_roots__ = roots
        return wrapper

    return decorate
