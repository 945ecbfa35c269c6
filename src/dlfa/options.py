"""Configuration dataclasses that validate themselves, and the command line generated from them.

Every entry point (``dlfa train``, a ``--config`` file in YAML or JSON, a sweep cell, the Python API) builds one
of the config dataclasses, and the dataclass checks every field when it is constructed: its type, its range, that
a float is finite, and the rules that tie fields together. So a value is validated in one place whatever its
source, and a bad one is one :class:`~dlfa.errors.DlfaInputError` naming the option (or the file and field).

A field is declared with :func:`option`, which records its help text and its range. The command line is generated
from the dataclasses by :class:`ConfigParser`, a ``transformers.HfArgumentParser`` (the parser of Hugging Face's
example scripts) that also knows dlfa's ranges, comma-separated lists and one-line errors. Nothing here imports
torch or transformers at module level, so that a bad option is refused before any heavy import.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from dlfa.errors import DlfaInputError

META = "dlfa"  # the key of dlfa's own settings in a field's metadata (the rest goes to argparse)


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    parse: Callable[[str], Any] | None = None,
    cli: bool = True,
    positional: bool = False,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field: ``help`` for ``--help``; ``low``/``high`` bound numbers (and list items); ``parse`` turns
    the command-line string into the value (e.g. comma-separated lists); ``flag`` is the option's name when it is
    not ``--field-name``. A field without a default is required."""
    spec = {"flag": flag, "low": low, "high": high, "low_open": low_open, "high_open": high_open, "parse": parse,
            "cli": cli, "positional": positional}
    metadata = {"help": help, META: spec}
    if flag:
        metadata["aliases"] = [flag]
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(config_class: type, name: str) -> str:
    """The command-line option of a field, as users see it in ``--help`` and in errors."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    spec = fields[name].metadata.get(META, {}) if name in fields else {}
    return spec.get("flag") or "--" + name.replace("_", "-")


# -- command-line value parsers --------------------------------------------------------------------------------


def comma_list(text: str) -> list[str] | None:
    """'de, fr' -> ['de', 'fr']; 'all' -> None (every language)."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    return None if items == ["all"] else items


def int_list(text: str) -> list[int]:
    """'1,2,5-7' -> [1, 2, 5, 6, 7]."""
    values: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, sep, high = part.partition("-")
        try:
            if sep and low:
                if int(high) < int(low):
                    raise ValueError
                values.extend(range(int(low), int(high) + 1))
            else:
                values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 1,2,5-7, got {text!r}") from None
    return values


def optional_int(text: str) -> int | None:
    """An integer, or 'none' for no value."""
    if text.strip().lower() in ("none", "null", "baseline"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer or 'none', got {text!r}") from None


# -- validation -----------------------------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    if origin in (list, Sequence):
        return f"a list of {_type_name(typing.get_args(annotation)[0])}s"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation,
                                                                                              str(annotation))


def _bounds_text(spec: Mapping[str, Any]) -> str:
    low, high = spec.get("low"), spec.get("high")
    parts = []
    if low is not None:
        parts.append(f"{'>' if spec.get('low_open') else '>='} {_number(low)}")
    if high is not None:
        parts.append(f"{'<' if spec.get('high_open') else '<='} {_number(high)}")
    return " and ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_bounds(value: float, spec: Mapping[str, Any]) -> bool:
    low, high = spec.get("low"), spec.get("high")
    if low is not None and (value <= low if spec.get("low_open") else value < low):
        return False
    return not (high is not None and (value >= high if spec.get("high_open") else value > high))


def check_value(value: Any, annotation: Any, spec: Mapping[str, Any]) -> Any:
    """``value`` converted to ``annotation`` (int -> float, a comma string -> list); ValueError says what is wrong."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return check_value(value, inner[0], spec)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = args
        if isinstance(value, str) and item_type is str:
            value = comma_list(value) or []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be {_type_name(annotation)}, got {value!r}")
        if not value:
            raise ValueError("must not be empty")
        return [check_value(item, item_type, spec) for item in value]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
    elif annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
    elif annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {value!r}")
        if not value.strip() or "\x00" in value:
            raise ValueError(f"must be a non-empty string, got {value!r}")
        return value
    if annotation in (int, float) and not _check_bounds(value, spec):
        raise ValueError(f"must be {_type_name(annotation)} {_bounds_text(spec)}, got {value!r}")
    return value


class Config:
    """Base of dlfa's config dataclasses: checks every field on construction, reads YAML/JSON files.

    Subclasses are ``@dataclass(kw_only=True)`` with fields made by :func:`option`, and put rules that tie fields
    together in :meth:`check`.
    """

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            try:
                value = check_value(getattr(self, f.name), hints[f.name], f.metadata.get(META, {}))
            except ValueError as exc:
                raise DlfaInputError(str(exc), option=flag_of(type(self), f.name)) from None
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules between fields; raise DlfaInputError(option=...)."""

    def option_name(self, name: str) -> str:
        return flag_of(type(self), name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | Path | None = None):
        """Build from a mapping; unknown keys and bad values name ``source`` (a file) when given."""
        unknown = sorted(set(data) - cls.field_names())
        if unknown:
            raise DlfaInputError(f"unknown field {unknown[0]!r}", path=source, option=None if source else unknown[0])
        if source is not None:
            check_fields(cls, data, source)
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path):
        return cls.from_dict(read_config_file(path, cls), source=path)


def check_fields(config_class: type, data: Mapping[str, Any], source: str | Path | None = None) -> None:
    """Check the fields present in ``data`` one by one, naming the file (``source``) and field, or the option."""
    hints = typing.get_type_hints(config_class)
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name, value in data.items():
        if name not in fields:
            raise DlfaInputError(f"unknown field {name!r}", path=source)
        try:
            check_value(value, hints[name], fields[name].metadata.get(META, {}))
        except ValueError as exc:
            if source is None:
                raise DlfaInputError(str(exc), option=flag_of(config_class, name)) from None
            raise DlfaInputError(f"field {name!r}: {exc}", path=source) from None


def read_config_file(path: str | Path, config_class: type | None = None) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding one mapping of field names to values."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DlfaInputError("config file not found", path=path) from None
    except IsADirectoryError:
        raise DlfaInputError("is a folder, not a config file", path=path) from None
    except UnicodeDecodeError:
        raise DlfaInputError("not valid UTF-8", path=path) from None
    except OSError as exc:
        raise DlfaInputError(f"cannot read the config file ({exc.strerror or exc})", path=path) from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise DlfaInputError(f"invalid YAML: {getattr(exc, 'problem', None) or exc}", path=path,
                                 line=mark.line + 1 if mark else None) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DlfaInputError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
    if not isinstance(data, dict):
        raise DlfaInputError("a config file holds one mapping of field names to values", path=path)
    return data


# -- the command line -----------------------------------------------------------------------------------------


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if value is None:
        return "default: none"
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f"default: {value}"


def _load_hf_parser() -> type:
    from transformers import HfArgumentParser

    return HfArgumentParser


class _OneLineErrors:
    def error(self, message: str) -> typing.NoReturn:  # argparse's usage errors become one line, exit status 2
        message = re.sub(r"argument (-[-\w]+)(?:/-[-\w]+)*:", r"option \1:", message)
        raise DlfaInputError(message if message.startswith("option ") else f"{self.prog}: {message}")


def build_parser(prog: str, config_classes: Sequence[type], exclude: Sequence[str] = (),
                 description: str | None = None) -> argparse.ArgumentParser:
    """An argument parser with one option per field of ``config_classes`` (minus ``exclude``).

    Every option's default is argparse's SUPPRESS, so ``parse_args`` returns only what was given: the caller layers
    it over a config file and the dataclass defaults, and the dataclass validates the result.
    """
    hf_parser = _load_hf_parser()

    class ConfigParser(_OneLineErrors, hf_parser):
        def _add_dataclass_arguments(self, dtype: type) -> None:
            hints = typing.get_type_hints(dtype)
            fields = [f for f in dataclasses.fields(dtype)
                      if f.init and f.name not in exclude and f.metadata.get(META, {}).get("cli", True)]
            for f in sorted(fields, key=lambda f: _default_text(f) != "required"):  # required options first
                self._add_field(dtype, f, hints[f.name])

        def _add_field(self, dtype: type, f: dataclasses.Field, hint: Any) -> None:
            spec = f.metadata.get(META, {})
            required = _default_text(f) == "required"
            group = self.required_group if required and not spec.get("positional") else self
            help_text = f"{f.metadata.get('help', '')} ({_default_text(f)})"
            primary = flag_of(dtype, f.name)
            metavar = primary.lstrip("-").upper().replace("-", "_")
            origin = typing.get_origin(hint)
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            listed = origin is list or (inner and typing.get_origin(inner[0]) is list)
            if spec.get("positional"):
                self.add_argument(f.name, nargs="+" if listed else None, help=help_text, metavar=metavar)
                return
            if listed and not spec.get("parse"):
                # A repeatable list option: every occurrence adds (argparse's "store" would keep the last).
                item = typing.get_args(hint if origin is list else inner[0])[0]
                group.add_argument(primary, dest=f.name, action="extend", nargs="+", type=item, help=help_text,
                                   metavar=metavar)
                return
            first = len(self._actions)
            clone = copy.copy(f)
            clone.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k != META})
            clone.type = hint
            hf_parser._parse_dataclass_field(group, clone)
            for action in self._actions[first:]:
                if spec.get("parse") and action.nargs != 0:  # not the --no-x complement of a bool
                    action.type, action.nargs = spec["parse"], None
                # One spelling per option: the dashed one (HfArgumentParser also adds --snake_case).
                for name in [s for s in action.option_strings if "_" in s]:
                    action.option_strings.remove(name)
                    del self._option_string_actions[name]
                if primary in action.option_strings:
                    action.option_strings.remove(primary)
                    action.option_strings.insert(0, primary)
                negative = action.nargs == 0 and action.option_strings[0].startswith("--no-")
                action.help = f"turn off {primary}" if negative else help_text
                if action.nargs != 0 and action.choices is None:
                    action.metavar = "BOOL" if action.const is True else metavar
                action.default = argparse.SUPPRESS
                action.required = False

    class _Parser(ConfigParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            argparse.ArgumentParser.__init__(self, **kwargs)  # groups first, then HfArgumentParser's fields
            self.required_group = self.add_argument_group("required options")
            self.dataclass_types = list(args[0])
            for dtype in self.dataclass_types:
                self._add_dataclass_arguments(dtype)

    return _Parser(list(config_classes), prog=prog, description=description,
                   formatter_class=argparse.HelpFormatter, argument_default=argparse.SUPPRESS)


def parse_config(config_class: type, given: Mapping[str, Any], file: str | Path | None = None,
                 fixed: Mapping[str, Any] | None = None):
    """``config_class`` from a config file (optional), the given options over it, and ``fixed`` values."""
    data = dict(read_config_file(file, config_class)) if file else {}
    if file:
        check_fields(config_class, data, file)
    names = config_class.field_names()
    given = {k: v for k, v in given.items() if k in names}
    check_fields(config_class, given)  # a bad value is named before a missing option
    data.update(given)
    data.update(fixed or {})
    missing = [f.name for f in dataclasses.fields(config_class)
               if f.init and f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        where = " (or give it in --config)" if file is not None or "config" in given else ""
        raise DlfaInputError(f"is required{where}", option=flag_of(config_class, missing[0]))
    return config_class(**data)


def command_line() -> str:
    """The command as typed (for config.json, reports and resume hints)."""
    import shlex

    return " ".join(shlex.quote(a) for a in ["dlfa", *sys.argv[1:]]) if sys.argv else "dlfa"
