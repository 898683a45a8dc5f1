"""Settings typed by their config dataclass, the same way from command-line flags and from YAML / JSON files.

    values = settings_file("run.yaml")                       # a mapping; a YAML syntax error names file:line
    values = typed_settings(TrainConfig, values, "run.yaml")  # each value as its field's annotation says

One converter per annotation (`convert`) serves both: `prefuse <cmd> --learning_rate 1e-3` (commands/flags.py uses
it as argparse's `type`) and `learning_rate: 1e-3` in a YAML file (a string to PyYAML, which reads YAML 1.1: a
number needs a dot and a signed exponent to be a float) give the same float; `use_peft: "false"` is False, as
`--use_peft false` is. A value that does not convert, or a key that is no field, is one line naming the file, the
key and what was expected (with "did you mean" for a near miss).
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
NONE = ("none", "null", "~")


def field_types(config_class) -> dict[str, Any]:
    """{field name: its annotation, resolved} of a config dataclass, in field order."""
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)}


def _parts(hint) -> tuple[list, bool]:
    """(the non-None members of a union annotation, whether None is one of them)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        members = list(typing.get_args(hint))
        return [m for m in members if m is not type(None)], type(None) in members
    return [hint], False


def expected(hint) -> str:
    """What a value of `hint` is, in words: 'a number', 'a list of whole numbers', 'true or false', ..."""
    members, optional = _parts(hint)
    words = []
    for member in members:
        origin = typing.get_origin(member)
        if origin is list:
            (item,) = typing.get_args(member) or (Any,)
            words.append(f"a list of {expected(item).removeprefix('a ').removeprefix('an ')}s"
                         if item in (str, int, float) else "a list")
        elif origin is dict or member is dict:
            words.append("a mapping of key: value")
        else:
            words.append({bool: "true or false", int: "a whole number", float: "a number",
                          str: "a string"}.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(words + (["none"] if optional else []))


def _scalar(value, kind):
    """`value` as bool, int, float or str; ValueError (no message) when it is not one."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise ValueError
    if isinstance(value, bool):  # True is an int to Python, never a number to a user
        raise ValueError  # noqa: TRY004 (the caller's one-line error)
    if kind is int:
        if isinstance(value, int):
            return value
        number = float(value.strip()) if isinstance(value, str) else value
        if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            return int(value.strip())
        if isinstance(number, float) and number.is_integer():
            return int(number)
        raise ValueError
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)):
            return str(value)
        raise ValueError
    return value


def convert(value, hint):
    """`value` (text from a flag, or what YAML / JSON read) as the annotation `hint` says: numbers from text,
    'true'/'false'/'yes'/'no'/'1'/'0' as bools, a single item as a one-item list, 'none' as None where None is
    allowed (and the field is no string). ValueError("expected <what>, got <value>") when it does not convert."""
    members, optional = _parts(hint)
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {expected(hint)}, got none")
    if optional and str not in members:  # none, or a flag's `none` as its list
        word = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
        if isinstance(word, str) and word.strip().lower() in NONE:
            return None
    for member in members:
        origin = typing.get_origin(member)
        try:
            if origin is list:
                (item,) = typing.get_args(member) or (Any,)
                items = list(value) if isinstance(value, (list, tuple)) else [value]
                return [_scalar(v, item) for v in items]
            if origin is dict or member is dict:
                if isinstance(value, Mapping):
                    return dict(value)
                raise ValueError
            return _scalar(value, member)
        except (ValueError, TypeError):
            continue
    note = " (YAML reads yes/no/on/off as true/false: quote it)" if isinstance(value, bool) and str in members else ""
    raise ValueError(f"expected {expected(hint)}, got {value!r}{note}")


def suggestion(name: str, names) -> str:
    """' (did you mean X?)' for the nearest of `names`, or ''."""
    close = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def typed_settings(config_class, values: Mapping, where: str, also=()) -> dict[str, Any]:
    """{field: value} of the raw mapping `values` (a YAML/JSON file's, or the flags'), each value converted to its
    field's annotation: the one checker of every command's settings. `where` names the source in the errors (the
    file; empty for the flags, whose errors name the flag); `also`: further accepted names left as they are (an objective's hyper-parameters). One-line ValueError
    for a key that is no field ("did you mean") and for a value that does not convert (file, key, expected type)."""
    types_of = field_types(config_class)
    out = {}
    for key, value in values.items():
        if key in types_of:
            try:
                out[key] = convert(value, types_of[key])
            except ValueError as error:
                raise ValueError(f"{where}: {key}: {error}" if where else f"{key}: {error}") from None
        elif key in also:
            out[key] = value
        else:
            raise ValueError(f"{where}: unknown setting {key!r}{suggestion(str(key), [*types_of, *also])}; the "
                             f"accepted keys are the command's flag names (see --help)")
    return out


def settings_file(path) -> dict[str, Any]:
    """The mapping of a YAML (or JSON) settings file; one-line ValueError naming the file (and the line of a syntax
    error) when it is missing, not YAML, or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config {path}{line}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ValueError(f"config {path}: not a text file") from None
    if values is None:
        return {}
    if not isinstance(values, dict):  # a ValueError: the commands' one-line error
        raise ValueError(  # noqa: TRY004
            f"config {path}: must hold a mapping of settings (key: value lines), got {type(values).__name__}")
    return values


def number_or_text(value):
    """A free-form value (an objective hyper-parameter) from text: an int or float when it reads as one (1e-4
    included, a string to YAML 1.1), else the value as it is."""
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value.strip())
            except ValueError:
                pass
    return value


__all__ = ["convert", "expected", "field_types", "number_or_text", "settings_file", "suggestion", "typed_settings"]
