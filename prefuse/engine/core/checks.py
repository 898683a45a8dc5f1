"""The one-line form of every settings error, shared by the sections of every command's settings."""


def check_field(ok: bool, name: str, message: str) -> None:
    """Raise `ValueError("<name>: <message>")` unless ok: the one-line form of every settings error."""
    if not ok:
        raise ValueError(f"{name}: {message}")
