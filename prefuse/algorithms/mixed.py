"""Mixed-DPO and Avg-DPO: DPO over an offline pair and a policy-generated pair (arXiv 2407.02477, eqs. 4-5).

Inputs, as keywords, all [B]:
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps   the offline pair (y+, y-)
    Mixed-DPO: policy_online_chosen_logps, policy_online_rejected_logps, ref_online_chosen_logps,
               ref_online_rejected_logps   the online pair (y~+, y~-) ranked by the annotator
    Avg-DPO:   policy_online_rejected_logps, ref_online_rejected_logps   the policy-generated rejected y~- (e.g. BDHS)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import reward_metrics
from .pair_scores import PAIR_INPUTS
from .registry import register


def _dpo(beta, policy_chosen, policy_rejected, ref_chosen, ref_rejected):
    return -F.logsigmoid(beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)))


def _offline_metrics(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    return reward_metrics(
        beta,
        policy_chosen_logps - ref_chosen_logps,
        policy_rejected_logps - ref_rejected_logps,
        policy_chosen_logps,
        policy_rejected_logps,
    )


ONLINE_PAIR_INPUTS = frozenset(
    {
        "policy_online_chosen_logps",
        "policy_online_rejected_logps",
        "ref_online_chosen_logps",
        "ref_online_rejected_logps",
    }
)


@register("mixed_dpo", requires=PAIR_INPUTS | ONLINE_PAIR_INPUTS, optional={"use_offline"}, hparams={"mixed_p": 0.5})
def mixed_dpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_online_chosen_logps,
    policy_online_rejected_logps,
    ref_online_chosen_logps,
    ref_online_rejected_logps,
    beta,
    use_offline=None,
    mixed_p=0.5,
):
    """Mixed-DPO: a * DPO(offline pair) + (1 - a) * DPO(online pair), a ~ Bernoulli(mixed_p) per example.

    The draw is the caller's (this function is pure): pass `use_offline` [B] bool. Without it, a = mixed_p, the
    expected loss (same expected gradient, no sampling noise). A loop that draws first can skip the forward pass of
    the pair it will not use: its weight is 0, so its inputs may be any finite values (prefuse's online source
    passes the drawn pair's log-probs for both, `engine/online/source.py`).

    Metrics: with a draw, rewards/* and logps/* are of the pair each example drew, and loss/offline, loss/online
    are each example's loss under the pair it drew (0 under the other), so their batch means add up to the loss;
    without one, rewards/* are of the offline pair and loss/offline, loss/online the two DPO terms.
    """
    offline = _dpo(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    online = _dpo(
        beta,
        policy_online_chosen_logps,
        policy_online_rejected_logps,
        ref_online_chosen_logps,
        ref_online_rejected_logps,
    )
    if use_offline is None:
        weight = torch.full_like(offline, mixed_p)
    else:
        weight = torch.as_tensor(use_offline, device=offline.device).to(offline.dtype)
    losses = weight * offline + (1 - weight) * online
    if use_offline is None:
        metrics = _offline_metrics(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                   ref_rejected_logps)
        metrics.update({"loss/offline": offline.detach(), "loss/online": online.detach()})
        return losses, metrics
    drawn = weight.bool()

    def pick(offline_value, online_value):
        return torch.where(drawn, offline_value, online_value)

    metrics = _offline_metrics(beta, pick(policy_chosen_logps, policy_online_chosen_logps),
                               pick(policy_rejected_logps, policy_online_rejected_logps),
                               pick(ref_chosen_logps, ref_online_chosen_logps),
                               pick(ref_rejected_logps, ref_online_rejected_logps))
    metrics.update({"loss/offline": (weight * offline).detach(), "loss/online": ((1 - weight) * online).detach()})
    return losses, metrics


@register(
    "avg_dpo",
    requires=PAIR_INPUTS | {"policy_online_rejected_logps", "ref_online_rejected_logps"},
    hparams={"avg_gamma": 0.5},
)
def avg_dpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_online_rejected_logps,
    ref_online_rejected_logps,
    beta,
    avg_gamma=0.5,
):
    """Avg-DPO: avg_gamma * DPO(y+, y-) + (1 - avg_gamma) * DPO(y+, y~-), the same chosen response in both."""
    external = _dpo(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    generated = _dpo(
        beta, policy_chosen_logps, policy_online_rejected_logps, ref_chosen_logps, ref_online_rejected_logps
    )
    losses = avg_gamma * external + (1 - avg_gamma) * generated
    metrics = _offline_metrics(beta, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    metrics.update({"loss/external_rejected": external.detach(), "loss/generated_rejected": generated.detach()})
    return losses, metrics
