"""linear_token_stats against the float64 reference (tolerance 2e-5 relative, float32 work), both backends."""
import pytest
import torch

import prefuse
from tests.reference import make_inputs, token_stats64

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]


def kw(backend):
    return {"backend": backend, **({"block_v": 128} if backend == "triton" else {})}


def check(stats, ref, mask):
    for name, value in ref.items():
        got = getattr(stats, name)
        assert got is not None, name
        if name == "label_is_argmax":
            assert torch.equal(got[mask], value[mask]), name
            continue
        scale = 1 + value[mask].abs().max().item()
        err = (got[mask].double() - value[mask]).abs().max().item()
        assert err <= 2e-5 * scale, (name, err)
        assert torch.all(got[~mask] == 0), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k,v,softcap", [(10, 300, None), (10, 300, 4.0), (5, 300, None), (50, 300, 4.0),
                                             (10, 7, None)])
def test_stats_match_reference(backend, top_k, v, softcap):
    hidden, weight, labels, b = make_inputs(16, 16, v, bias=True, scale=3.0)
    # make some labels the argmax so both outcomes of label_is_argmax are exercised
    with torch.no_grad():
        logits = hidden @ weight.t() + b
    labels[:8] = logits[:8].argmax(-1)
    labels[8:10] = -100
    stats = prefuse.linear_token_stats(hidden, weight, labels, bias=b, temperature=0.9, softcap=softcap,
                                       top_k=top_k, chunk_size=7, **kw(backend))
    ref = token_stats64(hidden, weight, labels, b, temperature=0.9, softcap=softcap, top_k=top_k)
    mask = labels != -100
    assert torch.equal(stats.mask, mask)
    assert stats.label_is_argmax[:8].all() and not stats.label_is_argmax[8:10].any()
    check(stats, ref, mask)
    means = stats.mean()
    assert means["topk_mass"] <= 1.0 + 1e-6 and means["entropy"] > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_without_labels_cover_every_position(backend):
    hidden, weight, _, _ = make_inputs(12, 8, 200, lead=(3, 4))
    stats = prefuse.linear_token_stats(hidden, weight, **kw(backend))
    assert stats.mask.all() and stats.logprobs is None and stats.label_is_argmax is None
    check(stats, token_stats64(hidden, weight), stats.mask)


def test_stats_have_no_gradient_and_k_equal_v_is_full_mass():
    hidden, weight, labels, _ = make_inputs(10, 8, 12)
    stats = prefuse.linear_token_stats(hidden, weight, labels, top_k=12)
    assert not stats.entropy.requires_grad
    mask = stats.mask
    assert torch.allclose(stats.topk_mass[mask], torch.ones(int(mask.sum())), atol=1e-6)
    assert torch.allclose(stats.topk_entropy[mask], stats.entropy[mask], atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_from_the_log_prob_pass(backend):
    """linear_logprobs(return_stats=True) reads the statistics from the forward's own chunks; the log-probs and
    their gradients are unchanged."""
    hidden, weight, labels, b = make_inputs(20, 16, 300, bias=True, scale=3.0)
    logp, stats = prefuse.linear_logprobs(hidden, weight, labels, bias=b, softcap=4.0, return_stats=True,
                                          top_k=5, chunk_size=6, **kw(backend))
    plain = prefuse.linear_logprobs(hidden, weight, labels, bias=b, softcap=4.0, chunk_size=6, **kw(backend))
    assert torch.equal(logp, plain)
    mask = labels != -100
    check(stats, token_stats64(hidden, weight, labels, b, softcap=4.0, top_k=5), mask)
    g1 = torch.autograd.grad(logp.sum(), [hidden, weight])
    g2 = torch.autograd.grad(plain.sum(), [hidden, weight])
    assert all(torch.equal(x, y) for x, y in zip(g1, g2))
