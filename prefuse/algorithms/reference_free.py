"""Objectives without a reference model: SimPO, CPO and ORPO (TRL 1.16 `CPOTrainer` / `ORPOTrainer` semantics).

Inputs, as keywords:
    policy_chosen_logps [B], policy_rejected_logps [B]   sums of the policy's response-token log-probs
    chosen_lengths [B], rejected_lengths [B]             response token counts (an empty response counts as one)
    beta                                                 temperature of the preference term
The averaging over tokens (SimPO, CPO's ipo/simpo, ORPO) happens here, from the sums and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import (
    EXP_CLAMP,
    batch_token_mean_nll,
    check_choice,
    per_token_mean,
    require_inputs,
    reward_metrics,
)
from .registry import register

PAIR_WITH_LENGTHS = frozenset({"policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"})
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def alphapo_reward(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO reward shape (1 - p^(-alpha)) / alpha with p = exp(logps); alpha = 0 gives logps itself. [B] -> [B]"""
    if alpha == 0.0:
        return logps
    # p^(-alpha) = exp(-alpha * logps); clamp the exponent so a very unlikely response stays finite
    return -torch.expm1(torch.clamp(-alpha * logps, max=EXP_CLAMP)) / alpha


def _preference_losses(chosen, rejected, *, beta, loss_type, label_smoothing, simpo_gamma):
    """CPO's preference term on rewards `chosen`, `rejected` [B]."""
    logits = chosen - rejected
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("sigmoid", "simpo"):
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2  # ipo


def _cpo(
    objective,
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta,
    loss_type,
    cpo_alpha,
    simpo_gamma,
    label_smoothing,
    alpha,
):
    check_choice("loss_type", loss_type, CPO_LOSS_TYPES)
    require_inputs(objective, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if loss_type in ("ipo", "simpo"):  # these compare per-token averages
        chosen, rejected = per_token_mean(chosen, chosen_lengths), per_token_mean(rejected, rejected_lengths)
    chosen_rewards, rejected_rewards = alphapo_reward(chosen, alpha), alphapo_reward(rejected, alpha)
    losses = _preference_losses(
        chosen_rewards,
        rejected_rewards,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
    metrics = reward_metrics(beta, chosen_rewards, rejected_rewards, chosen, rejected)
    if cpo_alpha != 0.0:  # behaviour cloning on the chosen responses: token mean over the whole batch
        nll = batch_token_mean_nll(policy_chosen_logps, chosen_lengths)
        losses = losses + cpo_alpha * nll
        metrics["nll_loss"] = nll.detach()
    return losses, metrics


@register(
    "simpo",
    requires=PAIR_WITH_LENGTHS,
    hparams={"simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0},
)
def simpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta,
    simpo_gamma=0.5,
    label_smoothing=0.0,
    alpha=0.0,
):
    """SimPO: -logsigmoid(beta * (avg_c - avg_r) - simpo_gamma), avg = per-token mean log-prob, no reference.

    label_smoothing gives the conservative (cDPO-style) form; alpha != 0 gives AlphaPO's reward shape. Without the
    NLL term (the paper's form). With TRL 1.16 semantics, CPO's loss_type="simpo" keeps cpo_alpha=1.0 unless told
    otherwise: that combination is the `cpo` objective with loss_type="simpo".
    """
    return _cpo(
        "simpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        loss_type="simpo",
        cpo_alpha=0.0,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        alpha=alpha,
    )


@register(
    "cpo",
    requires=PAIR_WITH_LENGTHS,
    hparams={"loss_type": "sigmoid", "cpo_alpha": 1.0, "simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0},
    separable=False,
)
def cpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta,
    loss_type="sigmoid",
    cpo_alpha=1.0,
    simpo_gamma=0.5,
    label_smoothing=0.0,
    alpha=0.0,
):
    """CPO: a reference-free preference term plus cpo_alpha * NLL of the chosen responses.

    loss_type: sigmoid | hinge on the summed log-probs; ipo | simpo on per-token means. The NLL is averaged over all
    chosen response tokens of the batch (added to each example, so the batch mean is TRL's sum of means); it makes
    the objective non-separable unless cpo_alpha = 0.
    """
    return _cpo(
        "cpo",
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        beta=beta,
        loss_type=loss_type,
        cpo_alpha=cpo_alpha,
        simpo_gamma=simpo_gamma,
        label_smoothing=label_smoothing,
        alpha=alpha,
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


# A per-token mean log-prob of exactly 0 (probability 1) makes log(1 - p) = -inf; keep it just below 0.
_MAX_MEAN_LOGP = -1e-12


@register(
    "orpo",
    requires=PAIR_WITH_LENGTHS,
    optional={"policy_chosen_prompt_logps", "chosen_prompt_lengths"},
    hparams={},
    separable=False,
)
def orpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta,
    policy_chosen_prompt_logps=None,
    chosen_prompt_lengths=None,
):
    """ORPO: NLL(chosen) - beta * logsigmoid(log odds(avg_c) - log odds(avg_r)), odds(p) = p / (1 - p).

    avg = per-token mean log-prob (clamped just below 0). The NLL is averaged over every chosen token of the batch.
    TRL 1.16 includes the prompt tokens in that NLL: pass `policy_chosen_prompt_logps` [B] (sum of the predicted
    prompt tokens' log-probs) and `chosen_prompt_lengths` [B] (their count) to do the same; without them the NLL
    covers the response only.
    """
    avg_chosen = per_token_mean(policy_chosen_logps, chosen_lengths).clamp(max=_MAX_MEAN_LOGP)
    avg_rejected = per_token_mean(policy_rejected_logps, rejected_lengths).clamp(max=_MAX_MEAN_LOGP)
    log_odds = (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))
    log_odds_ratio = F.logsigmoid(log_odds)

    nll_logps, nll_lengths = policy_chosen_logps, torch.as_tensor(chosen_lengths)
    if policy_chosen_prompt_logps is not None or chosen_prompt_lengths is not None:
        require_inputs(
            "orpo with prompt tokens",
            policy_chosen_prompt_logps=policy_chosen_prompt_logps,
            chosen_prompt_lengths=chosen_prompt_lengths,
        )
        nll_logps = nll_logps + policy_chosen_prompt_logps
        nll_lengths = nll_lengths + torch.as_tensor(chosen_prompt_lengths)
    nll = batch_token_mean_nll(nll_logps, nll_lengths)

    losses = nll - beta * log_odds_ratio
    metrics = reward_metrics(beta, avg_chosen, avg_rejected, avg_chosen, avg_rejected)
    metrics.update(
        {"nll_loss": nll.detach(), "log_odds_ratio": log_odds_ratio.detach(), "log_odds_chosen": log_odds.detach()}
    )
    return losses, metrics
