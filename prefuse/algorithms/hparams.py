"""Hyper-parameter values that make an objective meaningless: a division by zero, a loss that no longer depends on
the policy (it learns nothing), or a range outside which the objective's formula means something else.

    check_hparams("ipo", beta=0.0, hparams={})   # ValueError: beta: 0 divides by zero in ipo's 1/(2 beta) ...

`RULES` holds, for every registered objective (tests/test_algorithms_hparams.py keeps it complete), the rules of its
hyper-parameters: (name, test of the value, what the value breaks, the fix). The engine's objective settings section
calls `check_hparams` once per objective with the run's beta and the objective's hyper-parameters (its defaults
overridden by the run's), so a bad value is refused in one line before any model is loaded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .registry import get_objective

__all__ = ["RULES", "Rule", "check_hparams"]


class Rule(NamedTuple):
    name: str                    # the hyper-parameter ("beta" or one of the objective's hparams)
    ok: Callable[[Any], bool]    # the value passes
    reason: str                  # what a failing value does to the objective, with the fix


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _non_negative(value: Any) -> bool:
    return _number(value) and value >= 0


def _beta_scales(family: str) -> Rule:
    """beta multiplies every log-ratio: at 0 the loss is a constant (log 2 for a sigmoid) and has no gradient."""
    return Rule("beta", _positive, f"0 multiplies every log-ratio of {family} by 0, so the loss is constant and "
                                   f"nothing is learned; give a positive --beta (0.1 is TRL's default)")


def _beta_divides(term: str) -> Rule:
    return Rule("beta", _positive, f"0 divides by zero in {term}; give a positive --beta (0.1 is TRL's default)")


def _smoothing_below_half(name: str) -> Rule:
    """label_smoothing is the probability a label is flipped: at 1/2 the loss no longer tells chosen from rejected,
    above it the preference is reversed."""
    return Rule("label_smoothing", lambda v: _number(v) and 0 <= v < 0.5,
                "must lie in [0, 0.5): at 0.5 the loss no longer tells chosen from rejected and above it "
                "the preference is reversed")


_CLIP = Rule("ppo_clip", _non_negative, "must be >= 0: the importance weight is clamped to [1 - ppo_clip, 1 + "
                                        "ppo_clip], empty below 0")
_EPSILON = (Rule("epsilon", _non_negative, "must be >= 0: the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"),
            Rule("epsilon_high", lambda v: v is None or _non_negative(v),
                 "must be >= 0 (or left out: epsilon): the ratio is clipped to [1 - epsilon, 1 + epsilon_high]"))
_KTO_WEIGHTS = (Rule("desirable_weight", _non_negative, "must be >= 0: a negative weight pushes desirable examples "
                                                        "down"),
                Rule("undesirable_weight", _non_negative, "must be >= 0: a negative weight pushes undesirable "
                                                          "examples up"))


def _both_weights(hparams: Mapping[str, Any]) -> bool:
    return not (hparams.get("desirable_weight") == 0 and hparams.get("undesirable_weight") == 0)


# beta scales the log-ratios (0: constant loss) or divides (0: ZeroDivisionError); an objective whose beta is a
# KL weight (0: no KL term, a meaningful choice) or unused has no beta rule.
RULES: dict[str, tuple[Rule, ...]] = {
    # the DPO family (dpo.py)
    "sigmoid": (_beta_scales("sigmoid"),),
    "hinge": (_beta_scales("hinge"),),
    "ipo": (_beta_divides("ipo's 1/(2 beta)"),),
    "exo_pair": (_beta_scales("exo_pair"),
                 Rule("label_smoothing", lambda v: _number(v) and 0 < v < 1,
                      "must lie in (0, 1): it is the target probability of the rejected response and "
                      "its log is taken (the paper uses 1e-3)")),
    "nca_pair": (_beta_scales("nca_pair"),),
    "robust": (_beta_scales("robust"), _smoothing_below_half("robust")),
    "bco_pair": (_beta_scales("bco_pair"),),
    "sppo_hard": (_beta_divides("sppo_hard's 1/(2 beta)"),),
    "aot": (_beta_scales("aot"), _smoothing_below_half("aot")),
    "aot_unpaired": (_beta_scales("aot_unpaired"), _smoothing_below_half("aot_unpaired")),
    "apo_zero": (_beta_scales("apo_zero"),),
    "apo_down": (_beta_scales("apo_down"),),
    "discopop": (_beta_scales("discopop"),
                 Rule("discopop_tau", _positive, "must be > 0: discopop divides the logits by it")),
    "sft": (),  # beta only scales the rewards/* metrics
    "sigmoid_norm": (_beta_scales("sigmoid_norm"),),
    # unpaired (kto.py)
    "kto": (_beta_scales("kto"), *_KTO_WEIGHTS),
    "apo_zero_unpaired": (_beta_scales("apo_zero_unpaired"), *_KTO_WEIGHTS),
    # reference-free (reference_free.py)
    "simpo": (_beta_divides("simpo's simpo_gamma / beta"), _smoothing_below_half("simpo")),
    "cpo": (Rule("beta", _positive, "0 leaves cpo's preference term constant (sigmoid, hinge) or divides by zero "
                                    "(simpo's simpo_gamma / beta, ipo's 1/(2 beta)); give a positive --beta"),
            _smoothing_below_half("cpo"),
            Rule("cpo_alpha", _non_negative, "must be >= 0: a negative weight unlearns the chosen responses")),
    "orpo": (),  # beta weighs the odds-ratio term: 0 leaves the NLL (SFT), a meaningful baseline
    # mixed and online (mixed.py, ofs.py, online.py, srpo.py)
    "mixed_dpo": (_beta_scales("mixed_dpo"),),
    "avg_dpo": (_beta_scales("avg_dpo"),),
    "ofs_dpo": (_beta_scales("ofs_dpo"),
                Rule("ofs_alpha", _non_negative, "must be >= 0: the weight of the slow module's pull toward the "
                                                 "fast one"),
                Rule("ofs_clamp", _positive, "must be > 0: the gap terms are clamped to [-ofs_clamp, ofs_clamp], "
                                             "constant at 0")),
    "selm": (_beta_scales("selm"), Rule("alpha", _non_negative, "must be >= 0: SELM's optimism weight")),
    "xpo": (Rule("beta", _positive, "0 leaves xpo's sigmoid term constant and divides by zero in its ipo term "
                                    "1/(2 beta); give a positive --beta (0.1 is TRL's default)"),
            Rule("alpha", _non_negative, "must be >= 0: XPO's exploration weight")),
    "online_ipo": (_beta_divides("online_ipo's target (p - 1/2) / beta"),),
    "nash_md": (),  # beta is the KL weight: 0 drops the KL term
    "hypo_kl": (),  # beta is not used
    "hypo": (_beta_scales("hypo's DPO term"),
             Rule("kl_coef", _non_negative, "must be >= 0: the weight of the online KL term")),
    "srpo": (_beta_scales("srpo"),
             Rule("srpo_alpha", lambda v: _number(v) and 0 <= v <= 1,
                  "must lie in [0, 1]: it mixes the improvement and generation losses")),
    # policy gradients (policy_gradient.py): beta is the KL weight, 0 (GRPO's default) drops the KL term
    "grpo": _EPSILON,
    "rloo": _EPSILON,
    # A-LoL and its baselines (alol.py): beta is alol_kl's KL weight, unused by the others
    "alol": (_CLIP,),
    "alol_seq": (_CLIP,),
    "alol_ref_free": (),
    "alol_kl": (),
    "wbc": (),
    "r_lol": (_CLIP,),
    "r_gold": (Rule("gold_min_prob", lambda v: _number(v) and 0 <= v <= 1,
                    "must lie in [0, 1]: the floor of a token probability"),),
}


def check_hparams(objective: str, beta: float, hparams: Mapping[str, Any]) -> None:
    """Raise `ValueError("<name>: <value> ... <reason and fix>")` for the first value that makes `objective`
    meaningless. hparams: the objective's hyper-parameters (its defaults overridden by the run's values)."""
    spec = get_objective(objective)
    values = {**spec.hparams, **hparams, "beta": beta}
    for rule in RULES.get(spec.name, ()):
        value = values.get(rule.name)
        if not rule.ok(value):
            raise ValueError(f"{rule.name}: {value!r} is refused for {spec.name}: {rule.reason}")
    if "desirable_weight" in spec.hparams and not _both_weights(values):
        raise ValueError(f"desirable_weight: 0 with undesirable_weight 0 is refused for {spec.name}: every example's "
                         "loss is multiplied by 0, so nothing is learned; give either a positive weight")
