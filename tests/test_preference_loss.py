"""PreferenceLoss against the unfused path in float64: full logits, log_softmax, gather, sum, objective.

Tolerance: the head works in float32, so values and gradients agree to 2e-5 relative to the reference's scale.
"""
import pytest
import torch

import prefuse
from prefuse.preference import PreferenceLoss

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
REFERENCE_FREE = {"simpo", "cpo", "orpo"}


def make_batch(pairs=3, length=9, hidden_size=16, vocab=150, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / 2).to(dtype)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, :3] = -100  # prompt
    labels[1, 6:] = -100  # padding of one chosen response
    ref_hidden = torch.randn(2 * pairs, length, hidden_size, generator=gen, dtype=torch.float64).to(dtype)
    return hidden.requires_grad_(), weight.requires_grad_(), labels, ref_hidden


def unfused(name, hidden, weight, labels, ref_hidden=None, ref_logps=None, **hparams):
    """The materializing path in float64."""
    def seq_logps(h, w):
        logp = torch.log_softmax(h.double() @ w.double().t(), dim=-1)
        keep = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1)

    batch = labels.shape[0] // 2
    seq = seq_logps(hidden, weight)
    counts = (labels != -100).sum(-1)
    ref = {}
    if ref_hidden is not None:
        r = seq_logps(ref_hidden, weight.detach())
        ref = dict(ref_chosen_logps=r[:batch], ref_rejected_logps=r[batch:])
    elif ref_logps is not None:
        ref = dict(ref_chosen_logps=ref_logps[0], ref_rejected_logps=ref_logps[1])
    return prefuse.objective_loss(name, policy_chosen_logps=seq[:batch], policy_rejected_logps=seq[batch:],
                                  chosen_lengths=counts[:batch], rejected_lengths=counts[batch:], **ref,
                                  **hparams)


def close(got, ref, rel=2e-5):
    scale = 1 + ref.double().abs().max().item()
    return (got.double() - ref.double()).abs().max().item() <= rel * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("name,hparams", [("sigmoid", {}), ("ipo", {}), ("hinge", {}), ("robust", {}),
                                          ("simpo", {"simpo_gamma": 0.3}), ("orpo", {}),
                                          (["sigmoid", "sft"], {"loss_weights": [0.8, 0.2]})])
def test_matches_unfused_path_with_reference_hidden_states(backend, mode, name, hparams):
    hidden, weight, labels, ref_hidden = make_batch()
    names = [name] if isinstance(name, str) else name
    reference_free = set(names) <= REFERENCE_FREE
    separable = all(prefuse.get_objective(n).separable for n in names)
    loss_fn = PreferenceLoss(name, beta=0.2, mode=mode if separable else "auto", backend=backend, chunk_size=14,
                             **hparams)
    ref_kw = {} if reference_free else {"ref_hidden": ref_hidden}
    loss, metrics = loss_fn(hidden, weight, labels, **ref_kw)
    expected, expected_metrics = unfused(name, hidden, weight, labels, beta=0.2, **ref_kw, **hparams)
    assert loss_fn.last_mode == (mode if separable else "recompute")
    assert close(loss, expected)
    for key, value in expected_metrics.items():
        assert close(metrics[key], value), key
    got = torch.autograd.grad(loss, [hidden, weight])
    want = torch.autograd.grad(expected, [hidden, weight])
    for g, w in zip(got, want):
        assert close(g, w)


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_precomputed_reference_log_probs_and_bias(mode):
    hidden, weight, labels, _ = make_batch(pairs=2)
    bias = torch.randn(weight.shape[0], dtype=torch.float64, requires_grad=True)
    ref_logps = (torch.tensor([-30.0, -25.0], dtype=torch.float64), torch.tensor([-28.0, -26.0], dtype=torch.float64))
    loss, _ = PreferenceLoss("sigmoid", mode=mode, chunk_size=12)(
        hidden, weight, labels, bias=bias, ref_chosen_logps=ref_logps[0], ref_rejected_logps=ref_logps[1])

    def with_bias(h, w):  # the unfused path with a bias: fold it into an extra hidden unit
        ones = torch.ones(*h.shape[:-1], 1, dtype=h.dtype)
        return torch.cat([h, ones], -1), torch.cat([w, bias[:, None]], -1)

    h2, w2 = with_bias(hidden, weight)
    expected, _ = unfused("sigmoid", h2, w2, labels, ref_logps=ref_logps)
    assert close(loss, expected)
    for g, w in zip(torch.autograd.grad(loss, [hidden, weight, bias]),
                    torch.autograd.grad(expected, [hidden, weight, bias])):
        assert close(g, w)


def test_in_forward_chunks_hold_whole_pairs_and_skip_the_recompute(chunk_rows):
    hidden, weight, labels, ref_hidden = make_batch(pairs=4, length=8)
    calls = chunk_rows
    loss_fn = PreferenceLoss("sigmoid", mode="in_forward", chunk_size=20)
    loss, _ = loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
    ref_rows = int((labels != -100).sum())
    policy_chunks = calls[len(calls) // 2:]  # the reference pass runs first
    per_pair = [(labels[p] != -100).sum().item() + (labels[p + 4] != -100).sum().item() for p in range(4)]
    assert sum(policy_chunks) == ref_rows and max(policy_chunks) <= 20
    assert all(c in {sum(per_pair[i:j]) for i in range(4) for j in range(i + 1, 5)} for c in policy_chunks)
    calls.clear()
    loss.backward()
    assert calls == []  # the gradient was formed in forward: no recompute matmul


def test_pair_longer_than_the_chunk_falls_back_or_errors():
    hidden, weight, labels, ref_hidden = make_batch(pairs=2, length=9)
    loss_fn = PreferenceLoss("sigmoid", chunk_size=4)
    loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)
    assert loss_fn.last_mode == "recompute"
    with pytest.raises(ValueError, match="in_forward"):
        PreferenceLoss("sigmoid", mode="in_forward", chunk_size=4)(hidden, weight, labels, ref_hidden=ref_hidden)


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_edge_cases_are_finite(mode):
    hidden, weight, labels, ref_hidden = make_batch(pairs=2)
    # a batch of one pair whose chosen and rejected are identical
    one = hidden[[0, 0]].detach().requires_grad_()
    loss, metrics = PreferenceLoss("sigmoid", mode=mode)(one, weight, labels[[0, 0]], ref_hidden=ref_hidden[[0, 0]])
    assert torch.isfinite(loss) and metrics["rewards/margins"].abs() < 1e-6
    torch.autograd.grad(loss, [one, weight])
    # huge logits: log-probs around -1e4 and below
    big = (hidden * 1e3).detach().requires_grad_()
    loss, metrics = PreferenceLoss("sigmoid", mode=mode)(big, weight, labels, ref_hidden=ref_hidden)
    grads = torch.autograd.grad(loss, [big, weight])
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_response_without_tokens_is_well_defined():
    hidden, weight, labels, ref_hidden = make_batch(pairs=2)
    labels = labels.clone()
    labels[3] = -100  # pair 1's rejected response has no labeled token
    for name in ("sigmoid", "ipo", "simpo"):
        kw = {} if name == "simpo" else {"ref_hidden": ref_hidden}
        loss, _ = PreferenceLoss(name)(hidden, weight, labels, **kw)
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, [hidden, weight]))


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_bf16_inputs_track_the_float64_result(mode):
    hidden, weight, labels, ref_hidden = make_batch(pairs=3, dtype=torch.float32)
    loss64, _ = unfused("sigmoid", hidden, weight, labels, ref_hidden=ref_hidden)
    h16 = hidden.detach().bfloat16().requires_grad_()
    w16 = weight.detach().bfloat16().requires_grad_()
    loss, _ = PreferenceLoss("sigmoid", mode=mode)(h16, w16, labels, ref_hidden=ref_hidden.bfloat16())
    assert loss.dtype == torch.float32 and abs(loss.item() - loss64.item()) < 0.05
    g_h, g_w = torch.autograd.grad(loss, [h16, w16])
    assert g_h.dtype == torch.bfloat16 and torch.isfinite(g_h.float()).all() and torch.isfinite(g_w.float()).all()


def test_bad_arguments_raise_clear_errors():
    hidden, weight, labels, ref_hidden = make_batch(pairs=2)
    with pytest.raises(ValueError, match="sigmoidd"):
        PreferenceLoss("sigmoidd")
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        PreferenceLoss("sigmoid", gamma=1.0)
    with pytest.raises(ValueError, match="hidden"):
        PreferenceLoss("sigmoid")(hidden[:3], weight, labels[:3], ref_hidden=ref_hidden[:3])
    with pytest.raises(ValueError, match="ref_hidden"):
        PreferenceLoss("simpo")(hidden, weight, labels, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        PreferenceLoss("sigmoid")(hidden, weight, labels)
    with pytest.raises(ValueError, match="ref_weight: shape"):  # e.g. the local shard of a sharded reference head
        PreferenceLoss("sigmoid")(hidden, weight, labels, ref_hidden=ref_hidden, ref_weight=weight[: len(weight) // 2])


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_policy_equal_to_reference_gives_exactly_zero_rewards(mode):
    """The reference runs through the same rows, chunks and reductions as the policy (step 0 of LoRA training)."""
    hidden, weight, labels, _ = make_batch(pairs=3, dtype=torch.float32)
    loss_fn = PreferenceLoss("sigmoid", mode=mode, chunk_size=None if mode == "recompute" else 40)
    loss, metrics = loss_fn(hidden, weight, labels, ref_hidden=hidden.detach().clone())
    assert loss_fn.last_mode == mode
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/rejected"] == 0
    assert metrics["rewards/accuracies"] == 0 and metrics["rewards/margins"] == 0
