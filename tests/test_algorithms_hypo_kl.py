"""HyPO's online KL term with kl_estimator="per_token_k3", against the exact reverse KL of a tiny tabular policy.

Every sequence of T_LEN tokens over a V-token vocabulary is enumerated, so expectations over y ~ pi are exact sums:
- the gradient of KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)) comes from autograd on that sum (float64);
- the estimator's expected gradient is sum_y sg(pi(y)) grad surrogate(y), each y passed as one sample.
They must agree (the estimator is unbiased); the pathwise gradient of k3 would not: in expectation it is the
gradient of the forward KL(pi_ref(.|y<t) || pi(.|y<t)) at the sampled prefixes, which the test checks too, and
which differs from the reverse KL's. The logged value, k3 summed over
tokens, must be non-negative per sample and average to the exact KL.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from prefuse.algorithms import get_objective, objective_loss

V, T_LEN = 3, 3


def _tabular(seed):
    """Policy logits (leaves) and reference logits for each position, conditioned on the whole prefix."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for t in range(T_LEN) for p in itertools.product(range(V), repeat=t)]
    policy = {p: (1.5 * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True) for p in prefixes}
    ref = {p: 1.5 * torch.randn(V, generator=g, dtype=torch.float64) for p in prefixes}
    return policy, ref


def _token_logps(logits, sequence):
    return torch.stack([torch.log_softmax(logits[sequence[:t]], -1)[sequence[t]] for t in range(len(sequence))])


def _enumerate(policy, ref):
    sequences = list(itertools.product(range(V), repeat=T_LEN))
    policy_tokens = torch.stack([_token_logps(policy, y) for y in sequences])  # [V^T, T]
    ref_tokens = torch.stack([_token_logps(ref, y) for y in sequences])
    return policy_tokens, ref_tokens


def _exact_kl(policy_tokens, ref_tokens):
    """KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)), over every sequence."""
    log_p, log_q = policy_tokens.sum(-1), ref_tokens.sum(-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def _forward_kl_per_prefix(policy, ref):
    """sum_t E_{y<t ~ sg(pi)} KL(pi_ref(.|y<t) || pi(.|y<t)), exact."""
    total = 0.0
    for prefix in policy:
        weight = _token_logps(policy, prefix).sum().exp().detach() if prefix else 1.0
        log_p, log_q = torch.log_softmax(policy[prefix], -1), torch.log_softmax(ref[prefix], -1)
        total = total + weight * (log_q.exp() * (log_q - log_p)).sum()
    return total


def _hypo_kl(policy_tokens, ref_tokens, padding):
    """Each enumerated sequence is one prompt with k = 1 sample ([N, 1, T]); `padding` extra masked positions hold
    -inf under the policy and garbage under the reference, which must change nothing."""
    n = policy_tokens.shape[0]
    mask = torch.ones(n, T_LEN, dtype=torch.bool)
    if padding:
        policy_tokens = torch.cat([policy_tokens, torch.full((n, padding), float("-inf"), dtype=torch.float64)], 1)
        ref_tokens = torch.cat([ref_tokens, torch.full((n, padding), 7.0, dtype=torch.float64)], 1)
        mask = torch.cat([mask, torch.zeros(n, padding, dtype=torch.bool)], 1)
    losses, metrics = get_objective("hypo_kl").fn(
        policy_online_logps=policy_tokens[:, :T_LEN].sum(-1, keepdim=True),
        ref_online_logps=ref_tokens[:, :T_LEN].sum(-1, keepdim=True),
        policy_online_token_logps=policy_tokens.unsqueeze(1),
        ref_online_token_logps=ref_tokens.unsqueeze(1),
        online_token_mask=mask.unsqueeze(1),
        kl_estimator="per_token_k3",
        beta=0.1,
    )
    return losses, metrics


@pytest.mark.parametrize("padding", [0, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_token_k3_gradient_is_the_reverse_kl_gradient(seed, padding):
    policy, ref = _tabular(seed)
    leaves = list(policy.values())
    policy_tokens, ref_tokens = _enumerate(policy, ref)
    probs = policy_tokens.sum(-1).exp().detach()
    assert torch.isclose(probs.sum(), torch.tensor(1.0, dtype=torch.float64))

    exact = torch.autograd.grad(_exact_kl(policy_tokens, ref_tokens), leaves, retain_graph=True)
    losses, _ = _hypo_kl(policy_tokens, ref_tokens, padding)
    estimated = torch.autograd.grad((probs * losses).sum(), leaves, retain_graph=True)
    for got, want in zip(estimated, exact):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    # the logged value: sum_t k3_t >= 0 per sample, and its expectation is the exact reverse KL
    r = (ref_tokens - policy_tokens).detach()
    torch.testing.assert_close(losses.detach(), (r.exp() - r - 1).sum(-1), rtol=1e-12, atol=1e-12)
    assert (losses >= 0).all()
    torch.testing.assert_close((probs * losses.detach()).sum(), _exact_kl(policy_tokens, ref_tokens).detach())

    # the premise: differentiating k3 (the former pathwise form) gives, in expectation, the gradient of the FORWARD
    # KL(pi_ref(.|y<t) || pi(.|y<t)) at each prefix y<t ~ pi, not the reverse KL's
    k3 = torch.exp(ref_tokens - policy_tokens) - (ref_tokens - policy_tokens) - 1
    pathwise = torch.autograd.grad((probs * k3.sum(-1)).sum(), leaves, retain_graph=True)
    forward = torch.autograd.grad(_forward_kl_per_prefix(policy, ref), leaves, retain_graph=True)
    for p, f in zip(pathwise, forward):
        torch.testing.assert_close(p, f, rtol=1e-9, atol=1e-12)
    assert max((p - e).abs().max() for p, e in zip(pathwise, exact)) > 1e-2


def test_per_token_k3_in_hypo_and_through_the_api():
    """hypo's KL part is the same surrogate (value and gradient), and loss/kl logs the k3 value."""
    policy, ref = _tabular(3)
    policy_tokens, ref_tokens = _enumerate(policy, ref)
    tokens = policy_tokens.detach().reshape(3, 9, T_LEN).clone().requires_grad_(True)  # 3 prompts, k = 9 samples
    refs = ref_tokens.detach().reshape(3, 9, T_LEN)
    online = {
        "policy_online_logps": tokens.sum(-1),
        "ref_online_logps": refs.sum(-1),
        "policy_online_token_logps": tokens,
        "ref_online_token_logps": refs,
        "online_token_mask": torch.ones(3, 9, T_LEN, dtype=torch.bool),
    }
    pair = {k: torch.full((3,), -4.0, dtype=torch.float64) for k in
            ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    loss, metrics = objective_loss("hypo", beta=0.1, kl_coef=0.5, kl_estimator="per_token_k3", **pair, **online)
    r = refs - tokens.detach()
    k3 = (r.exp() - r - 1).sum(-1).mean(-1)
    torch.testing.assert_close(loss, torch.log(torch.tensor(2.0, dtype=torch.float64)) + 0.5 * k3.mean())
    torch.testing.assert_close(metrics["loss/kl"], k3.mean().float())

    (grad,) = torch.autograd.grad(loss, tokens)
    to_go = (tokens.detach() - refs).flip(-1).cumsum(-1).flip(-1)  # sum_{s >= t} log pi_s - log pi_ref_s
    torch.testing.assert_close(grad, 0.5 * to_go / (3 * 9), rtol=1e-10, atol=1e-12)
