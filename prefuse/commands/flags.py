"""Flags from config dataclasses: a --flag per field (typed from its annotation by the same converter that types a
YAML --config file's values, engine/core/typed_settings.py; its help from the field's metadata), the --config file
of settings, the parser class of every command (negative numbers as values, an unknown flag answered with the
command's own usage and a near match), and the parsers of flag values that the commands share."""
from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing

from prefuse.engine.core.typed_settings import (
    convert,
    expected,
    field_types,
    number_or_text,
    settings_file,
    suggestion,
    typed_settings,
)

# a number, exponent and sign included (argparse's own matcher takes "-1e-3" for a flag)
NEGATIVE_NUMBER = re.compile(r"^-(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$|^-inf$", re.IGNORECASE)
LONG_USAGE = 300  # characters: a usage longer than this is shortened in an error (prefuse train has ~200 flags)


class CommandParser(argparse.ArgumentParser):
    """The parser of one command (`prefuse <cmd>`): "-1e-3" is a value, not a flag; an unknown flag or extra
    argument is this command's error (its usage line, "did you mean --x?" for a near miss), exit status 2."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            flags = [s for a in self._actions for s in a.option_strings]
            hints = "".join(suggestion(e.split("=", 1)[0], flags) for e in extras if e.startswith("-"))
            self.error(f"unrecognized arguments: {' '.join(extras)}{hints}")
        return namespace, extras

    def error(self, message):
        usage = self.format_usage()
        if len(usage) > LONG_USAGE:
            usage = f"usage: {self.prog} [--flag VALUE ...]  (`{self.prog} --help` lists the flags)\n"
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def flag_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case), as a YAML file's bool settings take them too."""
    return flag_type(bool)(text)


def flag_type(hint):
    """argparse's `type` for a field annotated `hint`: the settings files' converter (typed_settings.convert), its
    error the flag's one line."""
    def parse(text: str):
        try:
            return convert(text, hint)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = expected(hint)
    return parse


def flag_value(text: str):
    """An objective hyper-parameter: a number (1e-4 included, which YAML 1.1 reads as a string), a bool or a
    string, as YAML reads it."""
    import yaml

    value = number_or_text(text)
    return yaml.safe_load(value) if isinstance(value, str) else value


def config_flags(p: argparse.ArgumentParser, config_class, special: dict | None = None) -> None:
    """A --flag per field of the dataclass `config_class`, typed from its annotation, its help from the field's
    metadata ({"help": ...}); `special`: argparse options for named fields; an absent flag leaves the field's
    default."""
    for f, hint in zip(dataclasses.fields(config_class), field_types(config_class).values()):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        # a None default that the objective fills says so in its help text
        shown = "" if default is None and "(default:" in text else f" (default: {default!r})"
        kwargs = {"default": argparse.SUPPRESS, "help": f"{text}{shown}".strip()}
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = [m for m in typing.get_args(hint) if m is not type(None)] if union else [hint]
        if f.name in (special or {}):
            kwargs.update(special[f.name])
        elif bool in members:
            kwargs.update(type=flag_type(hint), nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(members[0]) is list:
            (item,) = typing.get_args(members[0])
            kwargs.update(type=flag_type(item), nargs="+")
        elif members[0] in (int, float):
            kwargs.update(type=flag_type(hint))
        p.add_argument(f"--{f.name}", **kwargs)


def add_config_file(parser: argparse.ArgumentParser) -> None:
    """--config FILE: a YAML file of the command's settings, keyed by its flags' names (flags given override it)."""
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                        help="YAML file of settings (the flags' names as keys; flags given here override it)")


def config_values(config_class, given: dict) -> dict:
    """The settings of a command's parsed flags `given` over its --config file's, typed and checked by the one
    checker (typed_settings) -> keyword arguments of `config_class`."""
    given = dict(given)
    values = {}
    if "config" in given:
        path = given.pop("config")
        values = typed_settings(config_class, settings_file(path), f"config {path}")
    values.update(typed_settings(config_class, given, ""))
    return values


__all__ = ["CommandParser", "add_config_file", "config_flags", "config_values", "flag_bool", "flag_type",
           "flag_value"]
