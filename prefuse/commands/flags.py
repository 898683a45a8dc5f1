"""Flags from config dataclasses: a --flag per field (typed from its annotation, its help from the field's metadata),
and the parsers of flag values that the commands share."""
from __future__ import annotations

import argparse

def flag_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_value(text: str):
    """An objective hyper-parameter: a number (1e-4 included, which YAML 1.1 reads as a string), a bool or a
    string, as YAML reads it."""
    import yaml

    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def config_flags(p: argparse.ArgumentParser, config_class, special: dict | None = None) -> None:
    """A --flag per field of the dataclass `config_class`, typed from its annotation, its help from the field's
    metadata ({"help": ...}); `special`: argparse options for named fields; an absent flag leaves the field's
    default."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        hint = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "")
        # a None default that the objective fills says so in its help text
        shown = "" if default is None and "(default:" in text else f" (default: {default!r})"
        kwargs = dict(default=argparse.SUPPRESS, help=f"{text}{shown}".strip())
        if f.name in (special or {}):
            kwargs.update(special[f.name])
        elif "bool" in hint:
            kwargs.update(type=flag_bool, nargs="?", const=True, metavar="BOOL")
        elif "list[float]" in hint:
            kwargs.update(type=float, nargs="+")
        elif "list[str]" in hint:
            kwargs.update(nargs="+")
        elif "int" in hint and "float" not in hint:
            kwargs.update(type=int)
        elif "float" in hint:
            kwargs.update(type=float)
        p.add_argument(f"--{f.name}", **kwargs)
