"""The statistics every DPO-family loss starts from, with the family-wide options applied (TRL 1.16 semantics).

Options, in the order they act:
- `ld_alpha` (LD-DPO): each log-prob becomes `public + ld_alpha * verbose`, where "verbose" is the part of a response
  past the shared length min(len_chosen, len_rejected). prefuse's inputs stay plain sums; the caller also supplies
  the verbose part of each sum, `policy_chosen_verbose_logps`, `policy_rejected_verbose_logps`,
  `ref_chosen_verbose_logps`, `ref_rejected_verbose_logps` [B] (see `common.verbose_token_mask`), and the adjusted
  log-prob is `logps - (1 - ld_alpha) * verbose_logps`. The adjusted values feed every loss and the metrics.
- `f_divergence_type` (f-DPO): the scores compared by the losses built on the chosen-rejected difference are f'(ratio)
  instead of the log-ratio: reverse_kl (log t), forward_kl (1 - 1/t), js_divergence (log 2 + logsigmoid(log t)),
  alpha_divergence ((t^(a-1) - 1)/(a-1), a = f_alpha_divergence_coef; a = 1 falls back to reverse_kl).
- `use_weighting` (WPO): each pair's loss is multiplied by w_chosen * w_rejected (no gradient), where
  w = exp( (sum_t log pi(y_t) - sum_t log sum_v pi(v)^2) / len ) from the raw (not LD-adjusted) policy log-probs; the
  caller supplies `policy_chosen_log_sum_sq_probs`, `policy_rejected_log_sum_sq_probs` [B] (sum over the response
  tokens of log sum_v pi(v | prefix)^2) and the lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import EXP_CLAMP, check_choice, require_inputs, reward_metrics, safe_exp, token_counts

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# Hyper-parameters every DPO-family loss accepts, and those of the losses built on the chosen-rejected difference.
COMMON_OPTIONS = {"ld_alpha": None, "use_weighting": False}
F_DIVERGENCE_OPTIONS = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}

PAIR_INPUTS = frozenset({"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"})
LD_INPUTS = frozenset(
    {
        "policy_chosen_verbose_logps",
        "policy_rejected_verbose_logps",
        "ref_chosen_verbose_logps",
        "ref_rejected_verbose_logps",
    }
)
WPO_INPUTS = frozenset({"policy_chosen_log_sum_sq_probs", "policy_rejected_log_sum_sq_probs"})
LENGTH_INPUTS = frozenset({"chosen_lengths", "rejected_lengths"})
OPTIONAL_PAIR_INPUTS = LD_INPUTS | WPO_INPUTS | LENGTH_INPUTS


@dataclass
class PairScores:
    """A batch of pairs after the family-wide options; every tensor is [B].

    chosen_logps/rejected_logps (policy), the ref_* log-probs and the log-ratios are LD-adjusted when ld_alpha is
    set; the *_scores are f'(ratio) of the f-divergence (the log-ratios for reverse_kl); weights is the WPO weight
    or None.
    """

    beta: float
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor | None
    ref_rejected_logps: torch.Tensor | None
    chosen_logratios: torch.Tensor | None
    rejected_logratios: torch.Tensor | None
    chosen_scores: torch.Tensor | None
    rejected_scores: torch.Tensor | None
    chosen_lengths: torch.Tensor | None
    rejected_lengths: torch.Tensor | None
    weights: torch.Tensor | None

    @property
    def delta_score(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores

    def per_token_scores(self, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores divided by the response token counts (an empty response counts as one token)."""
        require_inputs(objective, chosen_lengths=self.chosen_lengths, rejected_lengths=self.rejected_lengths)
        return (
            self.chosen_scores / token_counts(self.chosen_lengths, self.chosen_scores),
            self.rejected_scores / token_counts(self.rejected_lengths, self.rejected_scores),
        )

    def finish(self, losses: torch.Tensor, **extra_metrics: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Apply the WPO weight and attach the TRL-named metrics."""
        if self.weights is not None:
            losses = losses * self.weights
        metrics = {}
        if self.chosen_logratios is not None:
            metrics = reward_metrics(
                self.beta, self.chosen_logratios, self.rejected_logratios, self.chosen_logps, self.rejected_logps
            )
        else:  # no reference given (the `sft` loss): only the log-probs
            metrics = {"logps/chosen": self.chosen_logps.detach(), "logps/rejected": self.rejected_logps.detach()}
        if self.weights is not None:
            metrics["wpo/weights"] = self.weights
        metrics.update(extra_metrics)
        return losses, metrics


def _ld_adjust(logps, verbose_logps, ld_alpha):
    return logps - (1.0 - ld_alpha) * verbose_logps


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha_coef: float) -> torch.Tensor:
    """f'(t) at t = pi/pi_ref, written in terms of log t. [B] -> [B]"""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1.0 - safe_exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    # alpha_divergence; at alpha = 1 the limit of f'(t) is log t
    if abs(alpha_coef - 1.0) < 1e-6:
        return logratios
    exponent = torch.clamp((alpha_coef - 1.0) * logratios, max=EXP_CLAMP)
    return torch.expm1(exponent) / (alpha_coef - 1.0)


def wpo_weights(logps, log_sum_sq_probs, lengths) -> torch.Tensor:
    """exp(mean over the response tokens of log pi(y_t) - log sum_v pi(v)^2), without gradient. [B] -> [B]"""
    mean_aligned = (logps.detach() - log_sum_sq_probs.detach()) / token_counts(lengths, logps)
    return safe_exp(mean_aligned)


def build_pair_scores(
    objective: str,
    *,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    policy_chosen_verbose_logps: torch.Tensor | None = None,
    policy_rejected_verbose_logps: torch.Tensor | None = None,
    ref_chosen_verbose_logps: torch.Tensor | None = None,
    ref_rejected_verbose_logps: torch.Tensor | None = None,
    policy_chosen_log_sum_sq_probs: torch.Tensor | None = None,
    policy_rejected_log_sum_sq_probs: torch.Tensor | None = None,
) -> PairScores:
    """Apply ld_alpha, the f-divergence and the WPO weight to a batch of pairs (see the module docstring)."""
    check_choice("f_divergence_type", f_divergence_type, F_DIVERGENCES)
    has_ref = ref_chosen_logps is not None and ref_rejected_logps is not None

    weights = None
    if use_weighting:  # from the raw log-probs, before the LD adjustment (as TRL 1.16 does)
        require_inputs(
            f"{objective} with use_weighting",
            policy_chosen_log_sum_sq_probs=policy_chosen_log_sum_sq_probs,
            policy_rejected_log_sum_sq_probs=policy_rejected_log_sum_sq_probs,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        weights = wpo_weights(policy_chosen_logps, policy_chosen_log_sum_sq_probs, chosen_lengths) * wpo_weights(
            policy_rejected_logps, policy_rejected_log_sum_sq_probs, rejected_lengths
        )

    chosen_logps, rejected_logps = policy_chosen_logps, policy_rejected_logps
    if ld_alpha is not None:
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
        require_inputs(
            f"{objective} with ld_alpha",
            policy_chosen_verbose_logps=policy_chosen_verbose_logps,
            policy_rejected_verbose_logps=policy_rejected_verbose_logps,
        )
        chosen_logps = _ld_adjust(chosen_logps, policy_chosen_verbose_logps, ld_alpha)
        rejected_logps = _ld_adjust(rejected_logps, policy_rejected_verbose_logps, ld_alpha)
        if has_ref:
            require_inputs(
                f"{objective} with ld_alpha",
                ref_chosen_verbose_logps=ref_chosen_verbose_logps,
                ref_rejected_verbose_logps=ref_rejected_verbose_logps,
            )
            ref_chosen_logps = _ld_adjust(ref_chosen_logps, ref_chosen_verbose_logps, ld_alpha)
            ref_rejected_logps = _ld_adjust(ref_rejected_logps, ref_rejected_verbose_logps, ld_alpha)

    chosen_logratios = rejected_logratios = chosen_scores = rejected_scores = None
    if has_ref:
        chosen_logratios = chosen_logps - ref_chosen_logps
        rejected_logratios = rejected_logps - ref_rejected_logps
        chosen_scores = f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef)
        rejected_scores = f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef)

    return PairScores(
        beta=beta,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        ref_chosen_logps=ref_chosen_logps if has_ref else None,
        ref_rejected_logps=ref_rejected_logps if has_ref else None,
        chosen_logratios=chosen_logratios,
        rejected_logratios=rejected_logratios,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        weights=weights,
    )
