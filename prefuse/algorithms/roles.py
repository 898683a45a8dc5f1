"""Sequence roles: an objective's input names say which sequences it scores and what it reads of each.

    policy_<role>_logps, ref_<role>_logps           per-sequence sums of response-token log-probs, [B] (or [P, k])
    <role>_lengths                                  response token counts
    policy_<role>_token_logps, ref_<role>_token_logps, <role>_token_mask    per-token values [B, T] (or [P, k, T])

Roles are chosen, rejected, sample, online_chosen, chosen_given_rejected, kl, ... The role "completion" (one
unpaired response per example) is written without its name: policy_logps, ref_logps, policy_token_logps,
ref_token_logps, token_mask. LD-DPO's policy_<role>_verbose_logps / ref_<role>_verbose_logps (chosen and rejected:
the part of a sum past the pair's shared length min(len_chosen, len_rejected)) are statistics of a role and its
partner. Every other input (preference_probs, advantages, labels, slow_*_logps, WPO's *_log_sum_sq_probs, ...) is
not a role statistic: callers pass it through.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .registry import ObjectiveSpec

COMPLETION = "completion"
STATS = ("logps", "lengths", "token_logps", "token_mask", "verbose_logps")
# LD-DPO's verbose part of a response is measured against the other response of its pair
PARTNER = {"chosen": "rejected", "rejected": "chosen"}
SOURCES = ("policy", "ref")

__all__ = ["COMPLETION", "PARTNER", "RoleInput", "parse_input", "input_name", "role_inputs", "declared_roles"]


@dataclass(frozen=True)
class RoleInput:
    """One role statistic an objective reads: `source` "policy" or "ref" (None for lengths and token masks),
    `stat` one of STATS, `required` False for an optional input."""

    name: str
    role: str
    stat: str
    source: str | None
    required: bool = True


def input_name(role: str, stat: str, source: str | None = None) -> str:
    """The input name of a role statistic: input_name("chosen", "logps", "policy") == "policy_chosen_logps"."""
    parts = [source] if stat in ("logps", "token_logps", "verbose_logps") else []
    if role != COMPLETION:
        parts.append(role)
    elif stat == "lengths":
        parts.append(role)  # "completion_lengths": a bare "lengths" would name nothing
    parts.append(stat)
    return "_".join(parts)


def _role_of(rest: str, suffix: str) -> str | None:
    """'chosen_logps' -> 'chosen', 'logps' -> COMPLETION for suffix 'logps'; None when it does not end so."""
    if rest == suffix:
        return COMPLETION
    if rest.endswith("_" + suffix):
        return rest[: -len(suffix) - 1]
    return None


def parse_input(name: str, required: bool = True) -> RoleInput | None:
    """The role statistic an input name stands for, or None for a pass-through input."""
    for source in SOURCES:
        if name.startswith(source + "_"):
            rest = name[len(source) + 1:]
            for stat in ("token_logps", "verbose_logps", "logps"):  # the longer suffixes first
                role = _role_of(rest, stat)
                if role is not None:
                    if stat == "verbose_logps" and role not in PARTNER:
                        return None
                    return RoleInput(name, role, stat, source, required)
            return None
    for stat in ("token_mask", "lengths"):
        role = _role_of(name, stat)
        if role is not None and not (stat == "lengths" and role == COMPLETION):
            return RoleInput(name, role, stat, None, required)
    return None


def role_inputs(specs: Iterable[ObjectiveSpec]) -> list[RoleInput]:
    """Every role statistic the objectives read (required by any of them wins over optional), sorted by name."""
    found: dict[str, RoleInput] = {}
    for spec in specs:
        for name in spec.inputs:
            parsed = parse_input(name, required=name in spec.requires)
            if parsed is not None and (name not in found or parsed.required):
                found[name] = parsed
    return [found[name] for name in sorted(found)]


def declared_roles(specs: Iterable[ObjectiveSpec]) -> list[str]:
    """The roles whose statistics the objectives read, required or optional, sorted."""
    return sorted({item.role for item in role_inputs(specs)})
