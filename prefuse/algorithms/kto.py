"""Unpaired objectives of TRL 1.16's `KTOTrainer`: KTO and the unpaired APO-zero.

Inputs, as keywords (one row per example, not per pair):
    policy_logps [B], ref_logps [B]        sums of the response-token log-probs under the policy and the reference
    labels [B]                             bool, True for a desirable example
    policy_kl_logps [B], ref_kl_logps [B]  (KTO) the same for the mismatched "KL" completions (each prompt paired with
                                           another example's response); they only set the reference point, no gradient
    beta
Losses come back in the input order; their mean equals TRL's mean over [desirable..., undesirable...].
"""

from __future__ import annotations

import torch

from .registry import register

UNPAIRED_INPUTS = frozenset({"policy_logps", "ref_logps", "labels"})
WEIGHTS = {"desirable_weight": 1.0, "undesirable_weight": 1.0}


def kl_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: the batch mean of the KL completions' log-ratio, clamped at 0, without gradient. [B] -> 0-d"""
    return (policy_kl_logps.detach() - ref_kl_logps.detach()).mean().clamp(min=0)


def _unpaired_metrics(beta, logratios, policy_logps, desirable):
    """TRL's metrics: means over the desirable (chosen) and undesirable (rejected) examples, when there are any."""
    rewards = beta * logratios.detach()
    metrics = {}
    for side, mask in (("chosen", desirable), ("rejected", ~desirable)):
        if mask.any():
            metrics[f"rewards/{side}"] = rewards[mask].mean()
            metrics[f"logps/{side}"] = policy_logps.detach()[mask].mean()
    if desirable.any() and (~desirable).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def _weights(desirable, like, desirable_weight, undesirable_weight):
    return torch.where(desirable, desirable_weight, undesirable_weight).to(like.dtype)


@register(
    "kto",
    requires=UNPAIRED_INPUTS | {"policy_kl_logps", "ref_kl_logps"},
    hparams=WEIGHTS,
    separable=False,
)
def kto(
    *,
    policy_logps,
    ref_logps,
    labels,
    policy_kl_logps,
    ref_kl_logps,
    beta,
    desirable_weight=1.0,
    undesirable_weight=1.0,
):
    """KTO: desirable 1 - sigmoid(beta (h - z0)), undesirable 1 - sigmoid(beta (z0 - h)), h = log-ratio, times the
    desirable/undesirable weight. z0 = kl_reference_point(...) is a batch statistic, so KTO is not separable.
    """
    desirable = torch.as_tensor(labels, device=policy_logps.device).bool()
    logratios = policy_logps - ref_logps
    kl = kl_reference_point(policy_kl_logps, ref_kl_logps)
    # 1 - sigmoid(x) = sigmoid(-x)
    losses = torch.where(desirable, torch.sigmoid(-beta * (logratios - kl)), torch.sigmoid(-beta * (kl - logratios)))
    losses = losses * _weights(desirable, losses, desirable_weight, undesirable_weight)
    metrics = _unpaired_metrics(beta, logratios, policy_logps, desirable)
    metrics["kl"] = kl
    return losses, metrics


@register("apo_zero_unpaired", requires=UNPAIRED_INPUTS, hparams=WEIGHTS)
def apo_zero_unpaired(*, policy_logps, ref_logps, labels, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """Unpaired APO-zero: desirable 1 - sigmoid(beta h), undesirable sigmoid(beta h), times the weights."""
    desirable = torch.as_tensor(labels, device=policy_logps.device).bool()
    logratios = policy_logps - ref_logps
    losses = torch.where(desirable, torch.sigmoid(-beta * logratios), torch.sigmoid(beta * logratios))
    losses = losses * _weights(desirable, losses, desirable_weight, undesirable_weight)
    return losses, _unpaired_metrics(beta, logratios, policy_logps, desirable)
