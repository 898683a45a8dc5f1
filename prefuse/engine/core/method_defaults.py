"""Per-method defaults of `--beta` and `--temperature`, and the temperature each online method's loss reads.

    values = method_defaults(["grpo"])            # {"beta": (0.0, "TRL 1.16 GRPOConfig"), "temperature": ...}
    # online --iterations: iteration_reference "previous" (SELM) or "initial" (RLHF Workflow's SFT model)
    loss_temperature("groups", 0.7)               # 0.7: GRPO's log-probs are taken at the sampling temperature

A setting left out takes its objective's value from its paper or from TRL 1.16's trainer config (the source is
printed at the start of a run and listed by `prefuse objectives`); an objective not listed takes TRL's DPO values.

Which distribution the loss reads (`LOSS_TEMPERATURE`, by online method):
- "sampled": every row's log-probs, the policy's and the reference's, at the sampling temperature T, i.e. of
  log_softmax(logits / T), the distribution the samples came from. GRPO and RLOO do so in TRL 1.16
  (`GRPOTrainer` / `RLOOTrainer` divide the logits by `temperature`); Nash-MD's and HyPO's policy-gradient
  estimators are unbiased only for samples of the distribution they differentiate.
- "online": HyPO's online rows at T (its KL estimator), its offline pairs at 1 (DPO on the data).
- "one": temperature 1, the model itself: the contrastive losses (online DPO and its family, online IPO, XPO,
  SELM, Mixed-DPO, Avg-DPO), as TRL 1.16's `OnlineDPOTrainer._forward` (log_softmax of the raw logits) and the
  SELM and RLHF Workflow authors' DPO trainers do; the sampling temperature only shapes which pairs are drawn.
"""
from __future__ import annotations

from prefuse.algorithms import get_objective

TRL_DPO = "TRL 1.16 DPOConfig / OnlineDPOConfig"
TRL_ONLINE_DPO = "TRL 1.16 OnlineDPOConfig"

# objective -> {setting: (value, where it comes from)}
DEFAULTS: dict[str, dict[str, tuple[float, str]]] = {
    "grpo": {"beta": (0.0, "TRL 1.16 GRPOConfig"), "temperature": (1.0, "TRL 1.16 GRPOConfig")},
    "rloo": {"beta": (0.05, "TRL 1.16 RLOOConfig"), "temperature": (1.0, "TRL 1.16 RLOOConfig")},
    "selm": {"beta": (0.01, "SELM, Zhang et al. 2024: every recipe's beta"),
             "iteration_reference": ("previous", "SELM, Zhang et al. 2024: the model at the iteration's start")},
    "nash_md": {"temperature": (1.0, "Nash-MD, Munos et al. 2024: y sampled from the policy itself")},
    "online_ipo": {"temperature": (1.0, "online IPO, Calandriello et al. 2024: self-play samples of the policy")},
    "hypo": {"temperature": (1.0, "HyPO, Song et al. 2024: its KL term's samples from the policy")},
    "hypo_kl": {"temperature": (1.0, "HyPO, Song et al. 2024: its KL term's samples from the policy")},
}
FALLBACK = {"beta": (0.1, TRL_DPO), "temperature": (0.9, TRL_ONLINE_DPO),
            "iteration_reference": ("initial", "RLHF Workflow, Dong et al. 2024: the SFT model in every iteration")}
SETTINGS = tuple(FALLBACK)

LOSS_TEMPERATURE = {"judged_pair": "one", "soft_pair": "one", "xpo": "one", "selm": "one", "mixed": "one",
                    "avg": "one", "nash_md": "sampled", "groups": "sampled", "samples": "sampled",
                    "hybrid": "online"}
LOSS_TEMPERATURE_WORDS = {
    "one": "log-probs at temperature 1 (the model itself; TRL's OnlineDPOTrainer), whatever --temperature samples",
    "sampled": "log-probs of policy and reference at the sampling temperature: log_softmax(logits / T)",
    "online": "the online samples' log-probs at the sampling temperature, the offline pairs' at 1",
}


def method_defaults(loss_types: list[str]) -> dict[str, tuple[float, str]]:
    """{setting: (value, source)} for loss_types; ValueError (`<setting>: ...`) when combined objectives default
    to different values (the run then has to give it)."""

    names = [get_objective(n).name for n in loss_types]
    out = {}
    for setting in SETTINGS:
        values = {DEFAULTS.get(n, {}).get(setting, FALLBACK[setting]) for n in names}
        if len({v for v, _ in values}) > 1:
            listed = ", ".join(f"{v} ({s})" for v, s in sorted(values, key=str))
            raise ValueError(f"{setting}: {loss_types} default to different values ({listed}); give --{setting}")
        out[setting] = min(values, key=str)
    return out


def loss_temperature(method: str, temperature: float) -> tuple[float, float]:
    """(the fused head's temperature, the online rows' temperature) of an online method sampling at
    `temperature`: (T, T), (1, T) for HyPO's online rows only, or (1, 1)."""
    kind = LOSS_TEMPERATURE[method]
    if kind == "sampled":
        return temperature, temperature
    return 1.0, temperature if kind == "online" else 1.0


def describe_defaults(loss_types: list[str], online_method: str | None) -> str:
    """One line for `prefuse objectives` and a run's start: the defaults and the loss's temperature."""
    try:
        values = method_defaults(loss_types)
    except ValueError as error:
        return str(error)
    if online_method not in ("judged_pair", "selm"):  # the methods that run --iterations
        values.pop("iteration_reference")
    text = ", ".join(f"{k} {v} ({s})" for k, (v, s) in values.items())
    if online_method is not None:
        text += "; online: " + LOSS_TEMPERATURE_WORDS[LOSS_TEMPERATURE[online_method]]
    return text
