"""The online policy-gradient baselines, TRL 1.16 semantics: GRPO and RLOO on k samples per prompt.

Inputs, as keywords ([P, k]: k samples of each of P prompts; token inputs [P, k, T]):
    rewards [P, k]                                        the judge's scores of the samples
    policy_online_token_logps, online_token_mask          (GRPO) per-token log-probs of the samples
    ref_online_token_logps                                (GRPO, beta > 0) the reference's
    policy_online_logps, ref_online_logps [P, k]          (RLOO) their sums; the reference's when beta > 0
One update per generation (prefuse samples every step): the "old" policy of the clipped ratio is the current one
without gradient, so the ratio is 1 in value and the clip never binds; its gradient is the policy gradient.
"""

from __future__ import annotations

import torch

from .common import check_choice, safe_exp
from .registry import register

GRPO_LOSS_TYPES = ("dapo", "grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, scale_rewards: str = "group") -> torch.Tensor:
    """GRPO's advantages [P, k]: the reward minus its group's mean, divided by the group's (or the batch's)
    standard deviation (Bessel-corrected) + 1e-4, or not divided ("none")."""
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    rewards = rewards.detach()
    advantages = rewards - rewards.mean(-1, keepdim=True)
    if scale_rewards == "group":
        advantages = advantages / (rewards.std(-1, keepdim=True) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (rewards.std() + 1e-4)
    return advantages


def leave_one_out_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """RLOO's advantages [P, k]: each reward minus the mean of its group's other rewards (k >= 2)."""
    rewards = rewards.detach()
    k = rewards.shape[-1]
    return rewards - (rewards.sum(-1, keepdim=True) - rewards) / (k - 1)


def _clipped_surrogate(log_ratio, advantages, epsilon, epsilon_high):
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + (epsilon if epsilon_high is None else epsilon_high))
    return -torch.min(ratio * advantages, clipped * advantages), ratio


@register(
    "grpo",
    requires={"policy_online_token_logps", "online_token_mask", "rewards"},
    optional={"ref_online_token_logps"},
    hparams={"epsilon": 0.2, "epsilon_high": None, "scale_rewards": "group", "grpo_loss_type": "dapo",
             "max_completion_length": None},
    separable=False,
)
def grpo(*, policy_online_token_logps, online_token_mask, rewards, beta, ref_online_token_logps=None,
         epsilon=0.2, epsilon_high=None, scale_rewards="group", grpo_loss_type="dapo", max_completion_length=None):
    """GRPO: per token -min(r A, clip(r) A) + beta * k3(pi_ref / pi), r = pi / sg(pi), A = group_advantages.

    grpo_loss_type (TRL's loss_type): "dapo" and "bnpo" (default "dapo"): the sum over the batch's tokens divided by
    their count; "grpo": each sample's token mean, then the mean; "dr_grpo": the sum divided by samples x
    max_completion_length. beta is TRL's KL coefficient (TRL's default 0.0; pass --beta 0 for it); k3 = exp(d) -
    d - 1 with d = log pi_ref - log pi. One loss per sample [P * k] whose mean is the batch loss.
    """
    check_choice("grpo_loss_type", grpo_loss_type, GRPO_LOSS_TYPES)
    mask = online_token_mask.bool()
    advantages = group_advantages(rewards, scale_rewards).unsqueeze(-1)
    per_token, ratio = _clipped_surrogate(policy_online_token_logps - policy_online_token_logps.detach(),
                                          advantages, epsilon, epsilon_high)
    metrics = {}
    if beta != 0.0:
        if ref_online_token_logps is None:
            raise ValueError("objective 'grpo' with beta != 0 needs ref_online_token_logps (or pass beta=0)")
        ref_minus_policy = ref_online_token_logps.detach() - policy_online_token_logps
        kl = safe_exp(ref_minus_policy) - ref_minus_policy - 1
        per_token = per_token + beta * kl
        metrics["kl"] = (torch.where(mask, kl, torch.zeros_like(kl)).sum() / mask.sum().clamp(min=1)).detach()
    summed = torch.where(mask, per_token, torch.zeros_like(per_token)).sum(-1).reshape(-1)  # [P * k]
    lengths = mask.sum(-1).reshape(-1).to(summed.dtype)
    n = summed.shape[0]
    if grpo_loss_type == "grpo":
        losses = summed / lengths.clamp(min=1)
    elif grpo_loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("grpo_loss_type='dr_grpo' needs max_completion_length")
        losses = summed / max_completion_length
    else:  # the batch's token sum over its token count, as n per-sample terms whose mean it is
        losses = summed * (n / lengths.sum().clamp(min=1))
    clipped = (ratio < 1 - epsilon) | (ratio > 1 + (epsilon if epsilon_high is None else epsilon_high))
    metrics["clip_ratio/region_mean"] = clipped[mask].float().mean().detach()
    metrics["reward"] = rewards.detach().float().mean()
    metrics["reward_std"] = rewards.detach().float().std(-1).mean()
    return losses, metrics


@register(
    "rloo",
    requires={"policy_online_logps", "rewards"},
    optional={"ref_online_logps"},
    hparams={"epsilon": 0.2, "epsilon_high": None},
    separable=True,
)
def rloo(*, policy_online_logps, rewards, beta, ref_online_logps=None, epsilon=0.2, epsilon_high=None):
    """RLOO (TRL 1.16): per sample -min(r A, clip(r) A) with r = pi(y) / sg(pi(y)) on sequence sums and A the
    leave-one-out advantage of the reward minus beta * sg(log pi(y) - log pi_ref(y)) (TRL's default beta 0.05).
    Separable by prompt (TRL's normalize_advantages, a batch statistic, is not offered).
    """
    rewards = rewards.detach().to(policy_online_logps.dtype)
    if beta != 0.0:
        if ref_online_logps is None:
            raise ValueError("objective 'rloo' with beta != 0 needs ref_online_logps (or pass beta=0)")
        rewards = rewards - beta * (policy_online_logps.detach() - ref_online_logps.detach())
    advantages = leave_one_out_advantages(rewards)
    losses, ratio = _clipped_surrogate(policy_online_logps - policy_online_logps.detach(), advantages, epsilon,
                                       epsilon_high)
    clipped = (ratio < 1 - epsilon) | (ratio > 1 + (epsilon if epsilon_high is None else epsilon_high))
    metrics = {"reward": rewards.mean(), "reward_std": rewards.std(-1).mean(),
               "clip_ratio/region_mean": clipped.float().mean().detach()}
    if ref_online_logps is not None:
        metrics["kl"] = (policy_online_logps - ref_online_logps).detach().mean()
    return losses.reshape(-1), metrics
