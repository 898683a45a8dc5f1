"""GRPO and RLOO against closed forms of TRL 1.16's definitions: on-policy, the clipped ratio is 1 and the
gradient of each log-prob is minus its advantage over the loss's normalizer."""
import pytest
import torch

import prefuse
from prefuse.algorithms.policy_gradient import group_advantages, leave_one_out_advantages

REWARDS = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]], dtype=torch.float64)


def test_advantages_closed_forms():
    loo = leave_one_out_advantages(REWARDS)
    assert torch.allclose(loo[0], torch.tensor([1 - 0.25, 0 - 0.75, 0.5 - 0.5], dtype=torch.float64))
    group = group_advantages(REWARDS)  # (r - mean) / (unbiased std + 1e-4)
    std0 = ((0.5 ** 2 + 0.5 ** 2 + 0) / 2) ** 0.5
    assert torch.allclose(group[0], torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64) / (std0 + 1e-4))
    assert torch.allclose(group_advantages(REWARDS, "none"), REWARDS - REWARDS.mean(-1, keepdim=True))


def token_inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logps = -torch.rand(2, 3, 5, generator=gen, dtype=torch.float64).requires_grad_()
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 1, 3:] = False
    mask[1, 2, 1:] = False
    return logps, mask


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_gradient_is_minus_the_advantage_over_the_normalizer(loss_type):
    logps, mask = token_inputs()
    loss, metrics = prefuse.objective_loss("grpo", policy_online_token_logps=logps, online_token_mask=mask,
                                           rewards=REWARDS, beta=0.0, grpo_loss_type=loss_type,
                                           max_completion_length=5)
    advantages = group_advantages(REWARDS)[..., None].expand(2, 3, 5)
    lengths = mask.sum(-1, keepdim=True).expand(2, 3, 5).double()
    normalizer = {"dapo": mask.sum().double(), "grpo": 6 * lengths, "dr_grpo": torch.tensor(6 * 5.0)}[loss_type]
    expected_grad = torch.where(mask, -advantages / normalizer, torch.zeros_like(advantages))
    (grad,) = torch.autograd.grad(loss, [logps])
    assert torch.allclose(grad, expected_grad)
    expected_value = (torch.where(mask, -advantages / normalizer, torch.zeros_like(advantages))).sum()
    assert torch.allclose(loss, expected_value)
    assert metrics["clip_ratio/region_mean"] == 0 and torch.isclose(metrics["reward"], REWARDS.mean().float())
    assert torch.isclose(metrics["reward_std"], REWARDS.std().float())  # TRL's: the batch's std, not the groups'
    assert metrics["frac_reward_zero_std"] == 0


@pytest.mark.parametrize("bias_correction", [True, False])
def test_grpo_kl_term_is_k3_with_its_gradient(bias_correction):
    logps, mask = token_inputs()
    ref = logps.detach() - 0.3
    loss, metrics = prefuse.objective_loss("grpo", policy_online_token_logps=logps, online_token_mask=mask,
                                           rewards=torch.zeros(2, 3, dtype=torch.float64),
                                           ref_online_token_logps=ref, beta=0.5,
                                           use_bias_correction_kl=bias_correction)
    d = torch.full_like(logps, -0.3)  # log pi_ref - log pi
    k3 = torch.exp(d) - d - 1
    n = mask.sum()
    assert torch.allclose(loss, 0.5 * k3[mask].sum() / n)
    (grad,) = torch.autograd.grad(loss, [logps])
    # TRL's default multiplies k3 by the ratio pi / sg(pi) (1 in value): d (k3 r) / d log pi = 1 - e^d + k3 = -d,
    # the reverse KL's gradient; without it, d k3 / d log pi = 1 - e^d
    expected = -d if bias_correction else 1 - torch.exp(d)
    assert torch.allclose(grad[mask], (0.5 * expected / n)[mask])
    assert torch.isclose(metrics["kl"].double(), k3[mask].mean(), rtol=1e-6)


def test_rloo_gradient_and_kl_penalty():
    gen = torch.Generator().manual_seed(1)
    logps = -10 * torch.rand(2, 3, generator=gen, dtype=torch.float64)
    logps.requires_grad_()
    ref = logps.detach() + torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, -0.1]], dtype=torch.float64)
    lengths = torch.tensor([[4, 2, 7], [1, 5, 3]])
    loss, metrics = prefuse.objective_loss("rloo", policy_online_logps=logps, ref_online_logps=ref,
                                           online_lengths=lengths, rewards=REWARDS, beta=0.05)
    penalized = REWARDS - 0.05 * (logps.detach() - ref)
    advantages = leave_one_out_advantages(penalized)
    (grad,) = torch.autograd.grad(loss, [logps])
    assert torch.allclose(grad, -advantages / 6)
    assert torch.allclose(loss, -advantages.mean())  # ~0: leave-one-out advantages sum to 0 per group
    # TRL's metrics: the KL per token of the batch, the judge's rewards before the penalty, their std over the batch
    assert torch.isclose(metrics["kl"].double(), (logps - ref).sum().detach() / lengths.sum(), rtol=1e-6)
    assert torch.isclose(metrics["reward"].double(), REWARDS.mean(), rtol=1e-6)
    assert torch.isclose(metrics["reward_std"].double(), REWARDS.std(), rtol=1e-6)
    _, metrics = prefuse.objective_loss("rloo", policy_online_logps=logps, ref_online_logps=ref, rewards=REWARDS,
                                        beta=0.05)
    assert "kl" not in metrics  # a per-token mean needs the token counts
