"""A-LoL (Advantage-Leftover-Lunch) offline policy gradients and the baselines of the same study.

Inputs, as keywords (one row per example (x, y) of the offline data):
    policy_logps [B], ref_logps [B]   sums of the response-token log-probs of y under the policy and pi_ref
    advantages [B]                    A = R(x, y) - V_ref(x), precomputed once before training
    rewards [B]                       R(x, y) (wbc, r_lol and r_gold)
    policy_token_logps [B, T], ref_token_logps [B, T], token_mask [B, T]   (alol_seq, r_gold) per-token log-probs
NLL(y) = -policy_logps; A+ = max(A, 0). Importance weights carry no gradient and are clamped to
[1 - ppo_clip, 1 + ppo_clip] (ppo_clip = 0.9, the authors' code default; docs/methods/alol.md).
"""

from __future__ import annotations

import torch

from .common import EXP_CLAMP
from .registry import register

CLIP = {"ppo_clip": 0.9}


def clipped_ratio(policy_logps: torch.Tensor, ref_logps: torch.Tensor, ppo_clip: float) -> torch.Tensor:
    """clamp(exp(sg(policy - ref)), 1 - ppo_clip, 1 + ppo_clip); any shape."""
    log_ratio = (policy_logps - ref_logps).detach().clamp(-EXP_CLAMP, EXP_CLAMP)
    return torch.exp(log_ratio).clamp(1 - ppo_clip, 1 + ppo_clip)


def _metrics(policy_logps, ref_logps, weights):
    metrics = {"logps/chosen": policy_logps.detach(), "alol/weights": weights.detach()}
    if ref_logps is not None:
        metrics["objective/kl"] = (policy_logps - ref_logps).detach()
    return metrics


@register("alol", requires={"policy_logps", "ref_logps", "advantages"}, hparams=CLIP)
def alol(*, policy_logps, ref_logps, advantages, beta, ppo_clip=0.9):
    """A-LoL: NLL(y) * clamp(pi/pi_ref) * A+, with a sequence-level importance weight."""
    weights = clipped_ratio(policy_logps, ref_logps, ppo_clip) * advantages.detach().clamp(min=0)
    return -policy_logps * weights, _metrics(policy_logps, ref_logps, weights)


@register("alol_seq", requires={"policy_token_logps", "ref_token_logps", "token_mask", "advantages"}, hparams=CLIP)
def alol_seq(*, policy_token_logps, ref_token_logps, token_mask, advantages, beta, ppo_clip=0.9):
    """A-LoL seq: sum_t NLL_t * clamp(pi_t/pi_ref_t) * A+, a clamped importance weight per TOKEN (despite the name).

    policy_token_logps, ref_token_logps, token_mask [B, T] -> losses [B].
    """
    mask = token_mask.bool()

    def masked_sum(values):  # where(), not a product: padding may hold any value, and inf * 0 would be NaN
        return torch.where(mask, values, torch.zeros_like(values)).sum(-1)

    token_weights = clipped_ratio(policy_token_logps, ref_token_logps, ppo_clip)
    positive = advantages.detach().clamp(min=0)
    losses = -masked_sum(policy_token_logps * token_weights) * positive
    mean_weights = masked_sum(token_weights) / mask.sum(-1).clamp(min=1) * positive
    return losses, _metrics(masked_sum(policy_token_logps), masked_sum(ref_token_logps), mean_weights)


@register("alol_ref_free", requires={"policy_logps", "advantages"}, hparams={})
def alol_ref_free(*, policy_logps, advantages, beta):
    """A-LoL ref-free: NLL(y) * A, no importance weight and no clipping of A."""
    weights = advantages.detach()
    return -policy_logps * weights, _metrics(policy_logps, None, weights)


@register("alol_kl", requires={"policy_logps", "ref_logps", "advantages"}, hparams={})
def alol_kl(*, policy_logps, ref_logps, advantages, beta):
    """A-LoL KL: NLL(y) * A+ + beta * (log pi(y) - log pi_ref(y)), no importance weight (the code's ppo_clip = 0).

    beta is the KL weight (kl_beta, docs/methods/alol.md); the paper's value is unknown, prefuse's default
    beta is 0.1. [UNVERIFIED]
    """
    weights = advantages.detach().clamp(min=0)
    return -policy_logps * weights + beta * (policy_logps - ref_logps), _metrics(policy_logps, ref_logps, weights)


@register("wbc", requires={"policy_logps", "rewards"}, hparams={})
def wbc(*, policy_logps, rewards, beta):
    """Reward-weighted behaviour cloning: NLL(y) * R."""
    weights = rewards.detach()
    return -policy_logps * weights, _metrics(policy_logps, None, weights)


@register("r_lol", requires={"policy_logps", "ref_logps", "rewards"}, hparams=CLIP)
def r_lol(*, policy_logps, ref_logps, rewards, beta, ppo_clip=0.9):
    """R-LoL: A-LoL with the reward in place of the advantage, NLL(y) * clamp(pi/pi_ref) * max(R, 0).

    The clip of R at 0 mirrors A+ [UNVERIFIED]; the authors' loop (LoL-RL @ 9f8d816) does not clip R, which makes
    no difference for its rewards, sigmoid scores in [0, 1] (a deliberate difference for negative rewards).
    """
    weights = clipped_ratio(policy_logps, ref_logps, ppo_clip) * rewards.detach().clamp(min=0)
    return -policy_logps * weights, _metrics(policy_logps, ref_logps, weights)


@register("r_gold", requires={"policy_token_logps", "token_mask", "rewards"}, hparams={"gold_min_prob": 0.1})
def r_gold(*, policy_token_logps, token_mask, rewards, beta, gold_min_prob=0.1):
    """R-GOLD: sum_t NLL_t * max(pi(y_t), gold_min_prob) * R, the token probability detached (GOLD's importance
    weight under a uniform-ish behaviour policy, lower-bounded; the authors use 0.1, 0.15 or 0.2 by task). R is not
    clipped, as in the authors' loop.

    policy_token_logps, token_mask [B, T], rewards [B] -> losses [B].
    """
    mask = token_mask.bool()

    def masked_sum(values):  # where(), not a product: padding may hold any value
        return torch.where(mask, values, torch.zeros_like(values)).sum(-1)

    token_weights = torch.exp(policy_token_logps.detach().clamp(max=0)).clamp(min=gold_min_prob)
    reward = rewards.detach()
    losses = -masked_sum(policy_token_logps * token_weights) * reward
    mean_weights = masked_sum(token_weights) / mask.sum(-1).clamp(min=1) * reward
    return losses, _metrics(masked_sum(policy_token_logps), None, mean_weights)
