"""The DPO family, one function per TRL 1.16 `DPOTrainer` loss_type, with the same names and semantics.

Every function takes, as keywords:
    policy_chosen_logps [B], policy_rejected_logps [B]   sums of the policy's response-token log-probs
    ref_chosen_logps [B], ref_rejected_logps [B]         the same under the reference model
    chosen_lengths [B], rejected_lengths [B]             response token counts (needed by ipo, sigmoid_norm, sft, WPO)
    beta                                                 the KL strength (tau for ipo)
plus the family-wide options `ld_alpha`, `use_weighting`, `f_divergence_type`, `f_alpha_divergence_coef` and their
extra inputs (see `pair_scores`), and returns (losses [B], metrics). Combining several losses (MPO style,
`loss_type=[...]` with `loss_weights=[...]`) is done by `loss.objective_loss` with a list of names.

The f-divergence applies to the losses built on the chosen-rejected score difference (sigmoid, hinge, ipo, exo_pair,
robust, discopop, sigmoid_norm); the others take no `f_divergence_type`, as in TRL 1.16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import EXP_CLAMP, batch_token_mean_nll, require_inputs
from .pair_scores import (
    COMMON_OPTIONS,
    F_DIVERGENCE_OPTIONS,
    OPTIONAL_PAIR_INPUTS,
    PAIR_INPUTS,
    PairScores,
    build_pair_scores,
)
from .registry import register

DIFFERENCE_OPTIONS = {**COMMON_OPTIONS, **F_DIVERGENCE_OPTIONS}


def _scores(objective: str, beta: float, stats: dict) -> PairScores:
    require_inputs(
        objective, ref_chosen_logps=stats.get("ref_chosen_logps"), ref_rejected_logps=stats.get("ref_rejected_logps")
    )
    return build_pair_scores(objective, beta=beta, **stats)


def _smoothed_sigmoid(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Binary cross-entropy on sigmoid(logits) against the soft label 1 - label_smoothing."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def _family(name: str, hparams: dict, *, aliases=(), separable=True, requires=PAIR_INPUTS):
    return register(
        name,
        requires=requires,
        optional=OPTIONAL_PAIR_INPUTS | PAIR_INPUTS,
        hparams=hparams,
        separable=separable,
        aliases=aliases,
    )


@_family("sigmoid", DIFFERENCE_OPTIONS, aliases=("dpo",))
def sigmoid(*, beta, **stats):
    """DPO: -logsigmoid(beta * (s_chosen - s_rejected)), s = log-ratio (or f'(ratio))."""
    s = _scores("sigmoid", beta, stats)
    return s.finish(-F.logsigmoid(beta * s.delta_score))


@_family("hinge", DIFFERENCE_OPTIONS, aliases=("slic",))
def hinge(*, beta, **stats):
    """SLiC hinge: relu(1 - beta * (s_chosen - s_rejected))."""
    s = _scores("hinge", beta, stats)
    return s.finish(torch.relu(1 - beta * s.delta_score))


@_family("ipo", DIFFERENCE_OPTIONS)
def ipo(*, beta, **stats):
    """IPO, length-normalized as TRL 1.16: (s_chosen/len_chosen - s_rejected/len_rejected - 1/(2 beta))^2.

    beta plays the role of tau, on per-token log-ratios. Needs chosen_lengths and rejected_lengths (an empty response
    counts as one token). `online_ipo` takes tau on whole-response log-ratios unless average_log_prob=True.
    """
    s = _scores("ipo", beta, stats)
    chosen, rejected = s.per_token_scores("ipo")
    return s.finish((chosen - rejected - 1 / (2 * beta)) ** 2)


@_family("exo_pair", {**DIFFERENCE_OPTIONS, "label_smoothing": 1e-3})
def exo_pair(*, beta, label_smoothing=1e-3, **stats):
    """EXO (pairwise): KL(q || p) with q = softmax of beta*scores over {chosen, rejected}, p = (1 - eps, eps).

    eps = label_smoothing must lie in (0, 1); TRL 1.16 has no usable default (0 is rejected) so prefuse defaults to
    the paper's 1e-3.
    """
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {label_smoothing}")
    s = _scores("exo_pair", beta, stats)
    logits = beta * s.delta_score
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    log_p_chosen = torch.log1p(torch.tensor(-label_smoothing, dtype=logits.dtype))
    log_p_rejected = torch.log(torch.tensor(label_smoothing, dtype=logits.dtype))
    losses = torch.sigmoid(logits) * (log_q_chosen - log_p_chosen) + torch.sigmoid(-logits) * (
        log_q_rejected - log_p_rejected
    )
    return s.finish(losses)


@_family("nca_pair", COMMON_OPTIONS)
def nca_pair(*, beta, **stats):
    """NCA (pairwise): -logsigmoid(r_c) - 0.5 logsigmoid(-r_c) - 0.5 logsigmoid(-r_r), r = beta * log-ratio."""
    s = _scores("nca_pair", beta, stats)
    chosen, rejected = beta * s.chosen_logratios, beta * s.rejected_logratios
    return s.finish(-F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected))


@_family("robust", {**DIFFERENCE_OPTIONS, "label_smoothing": 0.0})
def robust(*, beta, label_smoothing=0.0, **stats):
    """Robust DPO: the DPO loss unbiased for labels flipped with probability eps = label_smoothing in [0, 0.5)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5 (a flip probability), got {label_smoothing}")
    s = _scores("robust", beta, stats)
    logits = beta * s.delta_score
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) / (
        1 - 2 * label_smoothing
    )
    return s.finish(losses)


@_family("bco_pair", COMMON_OPTIONS)
def bco_pair(*, beta, **stats):
    """BCO (pairwise, without the running reward shift): -logsigmoid(r_c) - logsigmoid(-r_r)."""
    s = _scores("bco_pair", beta, stats)
    return s.finish(-F.logsigmoid(beta * s.chosen_logratios) - F.logsigmoid(-beta * s.rejected_logratios))


@_family("sppo_hard", COMMON_OPTIONS)
def sppo_hard(*, beta, **stats):
    """SPPO with hard probabilities: (h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2, h = log-ratio."""
    s = _scores("sppo_hard", beta, stats)
    return s.finish((s.chosen_logratios - 0.5 / beta) ** 2 + (s.rejected_logratios + 0.5 / beta) ** 2)


@_family("aot", {"ld_alpha": None, "label_smoothing": 0.0}, separable=False)
def aot(*, beta, label_smoothing=0.0, **stats):
    """AOT (paired): sorts the batch's policy margins and reference margins separately, then a smoothed sigmoid loss
    on sorted(policy_c - policy_r) - sorted(ref_c - ref_r). Not separable: example i's loss uses the batch order.
    WPO weighting is refused (the sort would misalign weights), as in TRL 1.16.
    """
    s = _scores("aot", beta, stats)
    policy_margins, _ = torch.sort(s.chosen_logps - s.rejected_logps, dim=0)
    ref_margins, _ = torch.sort(s.ref_chosen_logps - s.ref_rejected_logps, dim=0)
    return s.finish(_smoothed_sigmoid(beta * (policy_margins - ref_margins), label_smoothing))


@_family("aot_unpaired", {"ld_alpha": None, "label_smoothing": 0.0}, separable=False)
def aot_unpaired(*, beta, label_smoothing=0.0, **stats):
    """AOT (unpaired): smoothed sigmoid loss on sorted(chosen log-ratios) - sorted(rejected log-ratios)."""
    s = _scores("aot_unpaired", beta, stats)
    chosen_sorted, _ = torch.sort(s.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(s.rejected_logratios, dim=0)
    return s.finish(_smoothed_sigmoid(beta * (chosen_sorted - rejected_sorted), label_smoothing))


@_family("apo_zero", COMMON_OPTIONS)
def apo_zero(*, beta, **stats):
    """APO-zero: (1 - sigmoid(beta h_c)) + sigmoid(beta h_r): raise chosen, lower rejected likelihood."""
    s = _scores("apo_zero", beta, stats)
    return s.finish(torch.sigmoid(-beta * s.chosen_logratios) + torch.sigmoid(beta * s.rejected_logratios))


@_family("apo_down", COMMON_OPTIONS)
def apo_down(*, beta, **stats):
    """APO-down: sigmoid(beta h_c) + (1 - sigmoid(beta (h_c - h_r))): lower both, rejected more."""
    s = _scores("apo_down", beta, stats)
    chosen = s.chosen_logratios
    return s.finish(torch.sigmoid(beta * chosen) + torch.sigmoid(-beta * (chosen - s.rejected_logratios)))


@_family("discopop", {**DIFFERENCE_OPTIONS, "discopop_tau": 0.05})
def discopop(*, beta, discopop_tau=0.05, **stats):
    """DiscoPOP: blend of the logistic loss and exp(-logits), mixed by sigmoid(logits / tau), logits = beta * delta.

    The exponential part is formed as exp(-logits + logsigmoid(logits/tau)) so a very negative margin (where the
    mixing weight is 0) gives 0, not inf * 0.
    """
    s = _scores("discopop", beta, stats)
    logits = beta * s.delta_score
    modulation = torch.sigmoid(logits / discopop_tau)
    weighted_exp = torch.exp(torch.clamp(-logits + F.logsigmoid(logits / discopop_tau), max=EXP_CLAMP))
    return s.finish(-F.logsigmoid(logits) * (1 - modulation) + weighted_exp)


@register(
    "sft",
    requires={"policy_chosen_logps", "chosen_lengths"},
    optional=OPTIONAL_PAIR_INPUTS | PAIR_INPUTS,
    hparams=COMMON_OPTIONS,
    separable=False,
)
def sft(*, beta, **stats):
    """NLL of the chosen responses averaged over every chosen token of the batch, the same value for each example.

    Uses the raw policy log-probs (ld_alpha only changes the metrics), as TRL 1.16. Not separable: the token mean
    spans the batch.
    The reference log-probs are optional (only the rewards metrics need them).
    """
    chosen = stats["policy_chosen_logps"]
    require_inputs("sft", chosen_lengths=stats.get("chosen_lengths"))
    has_rejected = stats.get("policy_rejected_logps") is not None
    if stats.get("use_weighting"):  # the WPO weight is a product over the pair
        require_inputs("sft with use_weighting", policy_rejected_logps=stats.get("policy_rejected_logps"))
    if not has_rejected:
        stats["policy_rejected_logps"] = torch.zeros_like(chosen)
        stats["ref_rejected_logps"] = None  # rewards metrics need the whole pair
    s = build_pair_scores("sft", beta=beta, **stats)
    batch_loss = batch_token_mean_nll(chosen, stats["chosen_lengths"])
    losses, metrics = s.finish(batch_loss.expand(chosen.shape[0]))
    if not has_rejected:
        metrics.pop("logps/rejected")
    return losses, metrics


@_family("sigmoid_norm", DIFFERENCE_OPTIONS)
def sigmoid_norm(*, beta, **stats):
    """DPO on per-token scores: -logsigmoid(beta * (s_c/len_c - s_r/len_r)). Needs the lengths."""
    s = _scores("sigmoid_norm", beta, stats)
    chosen, rejected = s.per_token_scores("sigmoid_norm")
    return s.finish(-F.logsigmoid(beta * (chosen - rejected)))
