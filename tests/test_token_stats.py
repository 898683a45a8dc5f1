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


@pytest.mark.parametrize("backend", BACKENDS)
def test_extra_top_k_from_the_same_pass_match_reference(backend, monkeypatch):
    """extra_top_k: topk_mass@k and topk_entropy@k for each k, equal to the float64 statistics of that k, from the
    chunks the main statistics use (one matmul per chunk: the same chunks as without extra_top_k); k > V is
    clamped; the main statistics are unchanged."""
    from prefuse.kernels import stats as stats_module

    chunk_rows, original = [], stats_module.chunk_logits

    def spy(hidden_chunk, weight, bias, **kwargs):
        chunk_rows.append(hidden_chunk.shape[0])
        return original(hidden_chunk, weight, bias, **kwargs)

    monkeypatch.setattr(stats_module, "chunk_logits", spy)
    hidden, weight, labels, b = make_inputs(16, 16, 40, bias=True, scale=3.0)
    options = dict(bias=b, softcap=4.0, top_k=10, chunk_size=7, **kw(backend))
    plain = prefuse.linear_token_stats(hidden, weight, labels, **options)
    chunks_without = list(chunk_rows)
    assert sum(chunks_without) == int((labels != -100).sum()) and len(chunks_without) >= 2
    stats = prefuse.linear_token_stats(hidden, weight, labels, extra_top_k=(5, 20, 50), **options)
    assert chunk_rows[len(chunks_without):] == chunks_without  # no extra matmul for the extra k
    mask = labels != -100
    for name in ("logsumexp", "entropy", "topk_mass", "topk_entropy", "topk_entropy_unnormalized", "logprobs"):
        assert torch.equal(getattr(stats, name), getattr(plain, name)), name
    assert sorted(stats.extra_topk) == sorted(f"{n}@{k}" for k in (5, 20, 50) for n in ("topk_mass", "topk_entropy"))
    for k in (5, 20, 50):
        ref = token_stats64(hidden, weight, labels, b, softcap=4.0, top_k=k)
        for name in ("topk_mass", "topk_entropy"):
            got = stats.extra_topk[f"{name}@{k}"]
            err = (got[mask].double() - ref[name][mask]).abs().max().item()
            assert err <= 2e-5 * (1 + ref[name][mask].abs().max().item()), (name, k, err)
            assert torch.all(got[~mask] == 0), (name, k)
    # k = 50 > V = 40 is all of the vocabulary: full mass, the full entropy
    assert torch.allclose(stats.extra_topk["topk_mass@50"][mask], torch.ones(int(mask.sum())), atol=1e-6)
    assert torch.allclose(stats.extra_topk["topk_entropy@50"][mask], stats.entropy[mask], atol=1e-5)
    means = stats.mean()
    assert means["topk_mass@5"] < means["topk_mass"] < means["topk_mass@20"] < 1.0 + 1e-6
    assert means["topk_entropy@5"] < means["topk_entropy"] < means["topk_entropy@20"]
    with pytest.raises(ValueError, match="extra_top_k: must be positive integers"):
        prefuse.linear_token_stats(hidden, weight, labels, extra_top_k=(5, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_sq_probs_is_exact_at_large_logits(backend):
    """log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z) at |z| ~ 1e4 (a naive exp overflows): finite and within
    float32 of the float64 value, both backends."""
    hidden, weight, labels, _ = make_inputs(12, 8, 300, scale=3e3, seed=3)
    with torch.no_grad():
        assert (hidden @ weight.t()).abs().max() > 5e3
    stats = prefuse.linear_token_stats(hidden, weight, labels, chunk_size=5, **kw(backend))
    ref = token_stats64(hidden, weight, labels)["log_sum_sq_probs"]
    mask = labels != -100
    got = stats.log_sum_sq_probs
    assert torch.isfinite(got).all() and torch.all(got[~mask] == 0)
    assert (got[mask].double() - ref[mask]).abs().max() <= 2e-5 * (1 + ref[mask].abs().max())
    # a uniform distribution gives log(1/V), a one-hot one 0
    flat = prefuse.linear_token_stats(torch.zeros(2, 8), weight, **kw(backend)).log_sum_sq_probs
    assert torch.allclose(flat, torch.full((2,), -torch.log(torch.tensor(300.0))), atol=1e-5)
