"""The one-line form of every settings error, and the field of a setting with its help text, shared by the sections
of every command's settings. It imports nothing of prefuse and sits on the engine's ground floor, below
every room whose settings use it (engine/data and engine/models included)."""
from dataclasses import field


def check_field(ok: bool, name: str, message: str) -> None:
    """Raise `ValueError("<name>: <message>")` unless ok: the one-line form of every settings error."""
    if not ok:
        raise ValueError(f"{name}: {message}")


def setting(default, help: str):
    """A dataclass field whose metadata holds its --help text (the flags are built from it); a list or dict default
    is copied for each instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
