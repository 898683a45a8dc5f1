"""The objective registry: a plain dict from a name to an `ObjectiveSpec`.

An objective is a pure function of sequence-level statistics:

    fn(*, <inputs as keyword tensors>, beta, **hparams) -> (losses [B], metrics dict[str, tensor [B] or 0-d])

`requires` names the inputs it cannot run without, `optional` the inputs it reads when present (or when an option
asks for them), `hparams` the hyper-parameters it accepts with their defaults. `beta` is passed to every objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ObjectiveSpec", "OBJECTIVES", "register", "get_objective", "list_objectives"]


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the rest of prefuse needs to know about one objective.

    separable: True when example i's loss depends only on example i's statistics (no batch-level sort, mean or
    reference point). The fused loss uses it to form gradients in forward, chunk by chunk.
    """

    name: str
    fn: Callable[..., tuple[Any, dict[str, Any]]]
    requires: frozenset[str]
    hparams: Mapping[str, Any]
    separable: bool = True
    optional: frozenset[str] = frozenset()
    aliases: tuple[str, ...] = ()
    doc: str = ""

    @property
    def inputs(self) -> frozenset[str]:
        """Every input name the objective reads: required and optional."""
        return self.requires | self.optional

    def accepts(self) -> str:
        """One line listing accepted inputs and hyper-parameters, for error messages."""
        required = ", ".join(sorted(self.requires)) or "-"
        optional = ", ".join(sorted(self.optional)) or "-"
        hparams = ", ".join(f"{k}={v!r}" for k, v in sorted(self.hparams.items())) or "-"
        return f"'{self.name}': inputs [{required}], optional inputs [{optional}], hparams [beta, {hparams}]"


# Canonical names and aliases both map to the spec; `list_objectives` reports the canonical ones.
OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register(
    name: str,
    *,
    requires: set[str] | frozenset[str],
    hparams: Mapping[str, Any],
    separable: bool = True,
    aliases: tuple[str, ...] | list[str] = (),
    optional: set[str] | frozenset[str] = frozenset(),
) -> Callable[[Callable], Callable]:
    """Decorator that registers `fn` under `name` (and `aliases`) and returns `fn` unchanged."""

    def wrap(fn: Callable) -> Callable:
        spec = ObjectiveSpec(
            name=name,
            fn=fn,
            requires=frozenset(requires),
            hparams=dict(hparams),
            separable=separable,
            optional=frozenset(optional) - frozenset(requires),
            aliases=tuple(aliases),
            doc=(fn.__doc__ or "").strip(),
        )
        for key in (name, *aliases):
            if key in OBJECTIVES:
                raise ValueError(f"objective name {key!r} is registered twice")
            OBJECTIVES[key] = spec
        return fn

    return wrap


def list_objectives() -> list[str]:
    """Canonical objective names, sorted (aliases are left out)."""
    return sorted(key for key, spec in OBJECTIVES.items() if key == spec.name)


def get_objective(name: str) -> ObjectiveSpec:
    """The spec registered under `name` or one of its aliases; a ValueError lists the accepted names."""
    try:
        return OBJECTIVES[name]
    except (KeyError, TypeError):
        aliases = sorted(key for key, spec in OBJECTIVES.items() if key != spec.name)
        raise ValueError(
            f"unknown objective {name!r}. Accepted names: {', '.join(list_objectives())}; aliases: {', '.join(aliases)}"
        ) from None
