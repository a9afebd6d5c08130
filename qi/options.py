"""How a setting is declared: once, on the typed config field it sets.

A config field made with :func:`option` carries everything a user-facing option needs: its
default, help text, choices (a tuple, or a function that asks the registry owning them), a
check, and how text from a command line, an environment variable or an MLproject parameter
becomes its value. The click commands, ``MLproject`` and the validation of a config built in
Python all read these declarations, so adding a setting is one edit in ``qi/config.py``.

This module knows nothing of click: :mod:`qi.cli.config_options` turns declarations into
click options, :mod:`qi.cli.mlproject` into ``MLproject`` parameters.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Check = Callable[[Any], "str | None"]  # returns what is wrong, or None


@dataclass(frozen=True, eq=False)
class Option:
    """The user-facing side of one config field (or of several: see :func:`shared_option`).

    ``choices`` may be a function so that the registry that owns the names (models,
    optimizers, samplers...) stays their only list; it is called when a command is built or a
    config is validated, never at import time.
    """

    help: str = ""
    flag: str | None = None  # command-line name; default: --field-name
    short: str | None = None  # e.g. "-o"
    required: bool = False
    negatable: bool = True  # booleans: --x/--no-x, or just --x
    choices: tuple[str, ...] | Callable[[], Iterable[str]] | None = None
    # names with this prefix are accepted beside the choices ("timm:<name>"); what follows
    # the prefix is checked where it is used (qi.models: an unknown timm name is one line)
    open_prefix: str | None = None
    noun: str | None = None  # "unknown <noun> 'x': choose one of ..."; default: the field name
    check: Check | None = None
    parse: Callable[[str], Any] | None = None  # text -> value where the type alone can't say
    must_exist: Literal["folder", "file"] | None = None  # paths, checked where users type them
    show_default: bool = True
    mlproject: bool = True  # an MLproject parameter of the entry points whose command has it

    def choice_names(self) -> tuple[str, ...] | None:
        if self.choices is None:
            return None
        names = self.choices() if callable(self.choices) else self.choices
        return tuple(names)

    def shown_choices(self) -> tuple[str, ...] | None:
        """The choices as help and errors show them (an open prefix as ``prefix<name>``)."""
        names = self.choice_names()
        if names is None or not self.open_prefix:
            return names
        return (*names, f"{self.open_prefix}<name>")

    def problem(self, value: Any, name: str) -> str | None:
        """What is wrong with ``value`` (already of the field's type), or None."""
        if value is None:
            return None
        names = self.choice_names()
        if names is not None:
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                opened = self.open_prefix and str(item).startswith(self.open_prefix)
                if opened and len(str(item)) == len(self.open_prefix):
                    return f"'{item}' names no architecture: write {self.open_prefix}<name>"
                if item not in names and not opened:
                    noun = self.noun or name.replace("_", " ")
                    shown = ", ".join(self.shown_choices())
                    return f"unknown {noun} '{item}': choose one of {shown}"
        return self.check(value) if self.check else None


OPTION_KEY = "qi.option"


def option(default: Any, help: str = "", **declaration: Any) -> Any:
    """A dataclass field with its option declaration (``Option``'s keywords)."""
    return _field(default, Option(help=help, **declaration))


@dataclass(frozen=True, eq=False)
class SharedOption:
    """One option that sets the same-named field of several configs (``--seed``): declared
    once here, placed on each config with :meth:`field`."""

    default: Any
    declaration: Option

    def field(self) -> Any:
        return _field(self.default, self.declaration)


def shared_option(default: Any, help: str = "", **declaration: Any) -> SharedOption:
    return SharedOption(default, Option(help=help, **declaration))


def _field(default: Any, declaration: Option) -> Any:
    metadata = {OPTION_KEY: declaration}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or None as the default of an option")
    return field(default=default, metadata=metadata)


def declaration_of(f: dataclasses.Field) -> Option | None:
    return f.metadata.get(OPTION_KEY)


# ---------------------------------------------------------------- checks: (value) -> problem


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be positive, got {value}"


def not_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def fraction(value: float) -> str | None:
    """A share that leaves something over: [0, 1)."""
    return None if 0 <= value < 1 else f"must be in [0, 1), got {value}"


def unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be in [0, 1], got {value}"


def recall_target(value: float) -> str | None:
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value}"


def missing_path(value: Path, kind: Literal["folder", "file"]) -> str | None:
    """What is wrong with a path the user typed. Checked at the command line only: a config
    read back from a finished run may name a folder this machine does not have."""
    path = Path(value).expanduser()
    if not path.exists():
        return f"{path} does not exist: check the path"
    if kind == "folder" and not path.is_dir():
        return f"{path} is a file: give the folder holding the images"
    if kind == "file" and not path.is_file():
        return f"{path} is a folder: give a file"
    return None


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in str(text).split(",") if item.strip())


def json_objects(text: str) -> tuple[dict, ...]:
    """A JSON object or list of objects, inline or in a file."""
    source = Path(text)
    try:
        raw = json.loads(source.read_text() if source.is_file() else text)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"needs JSON (inline or a file): {exc}") from exc
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not all(isinstance(t, dict) for t in items):
        raise ValueError("needs a JSON object or a list of objects")
    return tuple(items)


# ---------------------------------------------------------------- types and validation


@dataclass(frozen=True)
class FieldType:
    """A field's annotation, read as what an option needs to know."""

    base: Any  # int, float, bool, str, Path, tuple, dict, or a dataclass
    optional: bool  # None is allowed
    literal: tuple[str, ...] | None = None  # Literal["a", "b"]
    item: Any = None  # element type of tuple[X, ...]


def field_type(owner: type, name: str) -> FieldType:
    hint = typing.get_type_hints(owner)[name]
    args = typing.get_args(hint)
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        optional = type(None) in args
        rest = [a for a in args if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else rest[0]
    if typing.get_origin(hint) is Literal:
        return FieldType(str, optional, literal=tuple(typing.get_args(hint)))
    if typing.get_origin(hint) is tuple:
        return FieldType(tuple, optional, item=typing.get_args(hint)[0])
    if typing.get_origin(hint) is dict:
        return FieldType(dict, optional)
    return FieldType(hint, optional)


def from_text(text: Any, kind: FieldType, declaration: Option) -> Any:
    """Command-line or MLproject text -> a value of the field's type.

    MLproject renders numbers as floats ("15.0") and unset strings as "": both are accepted.
    Raises ValueError with a message fit for a user.
    """
    if not isinstance(text, str):
        return text
    stripped = text.strip()
    if stripped == "" and (kind.optional or kind.base is tuple):
        return None if kind.optional else ()
    if declaration.parse is not None:
        return declaration.parse(stripped)
    if kind.base is bool:
        lowered = stripped.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{text!r} is not true or false")
    if kind.base is int:
        try:
            number = float(stripped)
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number") from None
        if not number.is_integer():
            raise ValueError(f"{text!r} is not a whole number")
        return int(number)
    if kind.base is float:
        try:
            return float(stripped)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
    if kind.base is Path:
        return Path(stripped).expanduser()
    if kind.base is tuple:
        items = comma_list(stripped)
        if kind.item in (int, float):  # "8,16" -> (8, 16)
            plain = dataclasses.replace(declaration, parse=None)
            return tuple(from_text(i, FieldType(kind.item, False), plain) for i in items)
        return items
    return stripped


def validate(config: Any) -> None:
    """Check every declared field of a config dataclass; ValueError names field and problem.

    Called from each config's ``__post_init__``: a config built in Python is checked as a
    command line is.
    """
    for f in dataclasses.fields(config):
        declaration = declaration_of(f)
        if declaration is None:
            continue
        problem = declaration.problem(getattr(config, f.name), f.name)
        if problem:
            raise ValueError(f"{type(config).__name__}.{f.name}: {problem}")


__all__ = [
    "FieldType",
    "Option",
    "SharedOption",
    "comma_list",
    "declaration_of",
    "field_type",
    "fraction",
    "from_text",
    "json_objects",
    "missing_path",
    "not_negative",
    "option",
    "positive",
    "recall_target",
    "shared_option",
    "unit_interval",
    "validate",
]
