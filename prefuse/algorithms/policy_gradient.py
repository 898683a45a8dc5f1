"""The online policy-gradient baselines, TRL 1.16 semantics: GRPO and RLOO on k samples per prompt.

Inputs, as keywords ([P, k]: k samples of each of P prompts; token inputs [P, k, T]):
    rewards [P, k]                                        the judge's scores of the samples
    policy_online_token_logps, online_token_mask          (GRPO) per-token log-probs of the samples
    ref_online_token_logps                                (GRPO, beta > 0) the reference's
    policy_online_logps, ref_online_logps [P, k]          (RLOO) their sums; the reference's when beta > 0
    online_lengths [P, k]                                 (RLOO, optional) token counts, for TRL's per-token kl metric
One update per generation (prefuse samples every step): the "old" policy of the clipped ratio is the current one
without gradient, so the ratio is 1 in value and the clip never binds; its gradient is the policy gradient.
Checked against TRL 1.16's own trainer code: tests/test_algorithms_trl_pg_golden.py.
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


def _clip_metrics(ratio, advantages, epsilon, epsilon_high, mask):
    """TRL's clip_ratio/*: the share of (unmasked) tokens or samples whose ratio is clipped where the clip binds,
    below 1 - epsilon with A < 0, above 1 + epsilon_high with A > 0 (0 on-policy, kept for the logs)."""
    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + (epsilon if epsilon_high is None else epsilon_high)) & (advantages > 0)
    count = mask.sum().clamp(min=1)
    return {f"clip_ratio/{name}": ((flags & mask).sum() / count).float().detach()
            for name, flags in (("low_mean", low), ("high_mean", high), ("region_mean", low | high))}


def _reward_metrics(rewards, std):
    """TRL's reward, reward_std (of the whole batch) and frac_reward_zero_std (the share of rows whose advantage
    std, `std` [P, 1] or 0-d, is 0) of the judge's rewards [P, k]."""
    rewards = rewards.detach().float()
    zero = torch.isclose(std, torch.zeros_like(std)).float().expand(rewards.shape)
    return {"reward": rewards.mean(), "reward_std": rewards.std(), "frac_reward_zero_std": zero.mean()}


@register(
    "grpo",
    requires={"policy_online_token_logps", "online_token_mask", "rewards"},
    optional={"ref_online_token_logps"},
    hparams={"epsilon": 0.2, "epsilon_high": None, "scale_rewards": "group", "grpo_loss_type": "dapo",
             "max_completion_length": None, "use_bias_correction_kl": True},
    separable=False,
)
def grpo(*, policy_online_token_logps, online_token_mask, rewards, beta, ref_online_token_logps=None,
         epsilon=0.2, epsilon_high=None, scale_rewards="group", grpo_loss_type="dapo", max_completion_length=None,
         use_bias_correction_kl=True):
    """GRPO: per token -min(r A, clip(r) A) + beta * k3(pi_ref / pi) * r, r = pi / sg(pi), A = group_advantages.

    grpo_loss_type (TRL's loss_type): "dapo" and "bnpo" (default "dapo"): the sum over the batch's tokens divided by
    their count; "grpo": each sample's token mean, then the mean; "dr_grpo": the sum divided by samples x
    max_completion_length. beta is TRL's KL coefficient (TRL's default 0.0; pass --beta 0 for it); k3 = exp(d) -
    d - 1 with d = log pi_ref - log pi. use_bias_correction_kl (TRL's default True) multiplies k3 by the ratio r:
    1 in value, it turns k3's gradient 1 - e^d into the reverse KL's, -d; False keeps k3's own. One loss per
    sample [P * k] whose mean is the batch loss.
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
        if use_bias_correction_kl:
            kl = kl * ratio
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
    metrics.update(_clip_metrics(ratio, advantages, epsilon, epsilon_high, mask))
    rewards = rewards.detach()
    std = rewards.std() if scale_rewards == "batch" else rewards.std(-1, keepdim=True)
    metrics.update(_reward_metrics(rewards, std))
    return losses, metrics


@register(
    "rloo",
    requires={"policy_online_logps", "rewards"},
    optional={"ref_online_logps", "online_lengths"},
    hparams={"epsilon": 0.2, "epsilon_high": None},
    separable=True,
)
def rloo(*, policy_online_logps, rewards, beta, ref_online_logps=None, online_lengths=None, epsilon=0.2,
         epsilon_high=None):
    """RLOO (TRL 1.16): per sample -min(r A, clip(r) A) with r = pi(y) / sg(pi(y)) on sequence sums and A the
    leave-one-out advantage of the reward minus beta * sg(log pi(y) - log pi_ref(y)) (TRL's default beta 0.05).
    Metrics as TRL logs them: reward and reward_std of the judge's rewards (before the KL penalty), kl the penalty's
    log-ratio per token (sum over the batch / its token count; only with online_lengths and beta != 0).
    Separable by prompt (TRL's normalize_advantages, a batch statistic, is not offered).
    """
    judged = rewards.detach()
    rewards = judged.to(policy_online_logps.dtype)
    metrics = {}
    if beta != 0.0:
        if ref_online_logps is None:
            raise ValueError("objective 'rloo' with beta != 0 needs ref_online_logps (or pass beta=0)")
        logratio = policy_online_logps.detach() - ref_online_logps.detach()
        rewards = rewards - beta * logratio
        if online_lengths is not None:
            metrics["kl"] = logratio.sum() / online_lengths.sum().clamp(min=1).to(logratio.dtype)
    advantages = leave_one_out_advantages(rewards)
    losses, ratio = _clipped_surrogate(policy_online_logps - policy_online_logps.detach(), advantages, epsilon,
                                       epsilon_high)
    metrics.update(_clip_metrics(ratio, advantages, epsilon, epsilon_high, torch.ones_like(ratio, dtype=torch.bool)))
    metrics.update(_reward_metrics(judged, rewards.std(-1, keepdim=True)))
    return losses.reshape(-1), metrics
