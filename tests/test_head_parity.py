"""Parity of linear_logprobs / linear_cross_entropy with the float64 reference, values and gradients, on both
backends (Triton under TRITON_INTERPRET=1, small shapes, a 128-wide tile so rows span several tiles).

Tolerances: fp32 and fp64 inputs (the head works in float32): |err| <= 2e-5 * (1 + |ref|) for values and
2e-5 * (1 + max|ref grad|) for gradients. bf16 / fp16: the error against the float64 truth may exceed the plain
torch path's own error in that dtype (logits in the dtype, log_softmax in float32, autograd) by at most 50% plus
1e-2 (bf16) / 2e-3 (fp16) of the reference's scale.
"""
import pytest
import torch
import torch.nn.functional as F

import prefuse
from tests.reference import cross_entropy64, grads, logprobs64, make_inputs

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
LOW_MARGIN = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def backend_kwargs(backend):
    return {"backend": backend, **({"block_v": 128} if backend == "triton" else {})}


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close64(got, ref, rel=2e-5):
    scale = 1.0 + ref.double().abs().max().item() if ref.numel() else 1.0
    assert max_err(got, ref) <= rel * scale, (max_err(got, ref), rel * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,h,v", [(1, 8, 5), (37, 24, 301), (64, 16, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_logprobs_fp32(backend, n, h, v, bias):
    hidden, weight, labels, b = make_inputs(n, h, v, bias=bias, scale=2.0)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=7, **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels, b)
    assert out.dtype == torch.float32 and out.shape == labels.shape
    assert_close64(out, ref)
    assert torch.all(out[labels == -100] == 0)
    params = [t for t in (hidden, weight, b) if t is not None]
    for g, r in zip(grads(out, params), grads(ref, params)):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,softcap", [(0.7, None), (1.0, 3.0), (1.3, 2.0)])
def test_logprobs_temperature_softcap(backend, temperature, softcap):
    hidden, weight, labels, b = make_inputs(29, 16, 300, bias=True, scale=3.0)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=temperature, softcap=softcap,
                                  chunk_size=8, **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels, b, temperature=temperature, softcap=softcap)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_matches_reference_and_torch(backend, reduction, mode, label_smoothing):
    hidden, weight, labels, b = make_inputs(3 * 11, 16, 257, bias=True, lead=(3, 11), scale=2.0)
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    out = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, mode=mode, chunk_size=5, **kw,
                                       **backend_kwargs(backend))
    ref = cross_entropy64(hidden, weight, labels, b, **kw)
    # drop-in semantics: the same numbers as F.cross_entropy on materialized logits
    torch_ref = F.cross_entropy((hidden.double() @ weight.double().t() + b.double()).flatten(0, 1),
                                labels.flatten(), **kw)
    assert_close64(ref.flatten(), torch_ref.flatten(), rel=1e-12)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_modes_agree_and_upstream_scalar_scales(backend):
    hidden, weight, labels, b = make_inputs(40, 16, 200, bias=True)
    results = {}
    for mode in ("in_forward", "recompute"):
        loss = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, mode=mode, chunk_size=9,
                                            **backend_kwargs(backend))
        results[mode] = (loss.detach(), torch.autograd.grad(loss * 2.5, [hidden, weight, b]))
    assert_close64(results["in_forward"][0], results["recompute"][0])
    for g1, g2 in zip(results["in_forward"][1], results["recompute"][1]):
        assert_close64(g1, g2)
    ref = cross_entropy64(hidden, weight, labels, b)
    for g, r in zip(results["in_forward"][1], torch.autograd.grad(ref * 2.5, [hidden, weight, b])):
        assert_close64(g, r)


def plain_path_logprobs(hidden, weight, labels, b):
    """What a user writes without prefuse: logits in the input dtype, log_softmax in float32."""
    logits = hidden @ weight.t() + (b if b is not None else 0)
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = labels != -100
    picked = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("accumulate_fp32", [True, False])
def test_low_precision_error_within_plain_path_error(backend, dtype, accumulate_fp32):
    hidden, weight, labels, b = make_inputs(48, 32, 500, dtype, bias=True, scale=2.0)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=10, accumulate_fp32=accumulate_fp32,
                                  **backend_kwargs(backend))
    plain = plain_path_logprobs(hidden, weight, labels, b)
    truth = logprobs64(hidden, weight, labels, b)
    margin = LOW_MARGIN[dtype]
    scale = 1 + truth.abs().max().item()
    assert max_err(out, truth) <= 1.5 * max_err(plain, truth) + margin * scale
    params = [hidden, weight, b]
    for g, p, t in zip(grads(out, params), grads(plain, params), grads(truth, params)):
        assert g.dtype == dtype
        gscale = 1 + t.abs().max().item()
        assert max_err(g, t) <= 1.5 * max_err(p, t) + margin * gscale, (max_err(g, t), max_err(p, t))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zeros_not_nan(backend, reduction):
    hidden, weight, labels, b = make_inputs(6, 8, 50, bias=True)
    labels[:] = -100
    loss = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, reduction=reduction,
                                        **backend_kwargs(backend))
    assert torch.all(loss == 0)
    g = torch.autograd.grad(loss.sum(), [hidden, weight, b])
    assert all(torch.all(x == 0) for x in g)
    lp = prefuse.linear_logprobs(hidden, weight, labels, **backend_kwargs(backend))
    assert lp.shape == labels.shape and torch.all(lp == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_some_rows_fully_ignored_in_batch(backend):
    hidden, weight, labels, b = make_inputs(4 * 9, 16, 120, lead=(4, 9))
    labels[1] = -100  # a whole sequence of prompt/padding only
    out = prefuse.linear_logprobs(hidden, weight, labels, chunk_size=4, **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels)
    assert_close64(out, ref)
    g, r = grads(out, [hidden])[0], grads(ref, [hidden])[0]
    assert torch.all(g[1] == 0)
    assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    gen = torch.Generator().manual_seed(1)
    base_hidden = torch.randn(11, 3, 16, generator=gen, dtype=torch.float64).float().requires_grad_()
    base_weight = torch.randn(16, 130, generator=gen, dtype=torch.float64).float().requires_grad_()
    hidden = base_hidden.transpose(0, 1)  # [3, 11, 16], not contiguous
    weight = base_weight.t()  # [130, 16], not contiguous
    labels = torch.randint(0, 130, (11, 3), generator=gen).t()
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    out = prefuse.linear_logprobs(hidden, weight, labels, chunk_size=5, **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [base_hidden, base_weight]), grads(ref, [base_hidden, base_weight])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_and_head(backend):
    emb = torch.nn.Embedding(90, 16).requires_grad_()
    ids = torch.randint(0, 90, (2, 10))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100

    def run(fn):
        emb.zero_grad()
        hidden = torch.tanh(emb(ids))  # the same parameter feeds the input and the head
        fn(hidden, emb.weight).sum().backward()
        return emb.weight.grad.clone()

    fused = run(lambda h, w: prefuse.linear_logprobs(h, w, labels, chunk_size=3, **backend_kwargs(backend)))
    ref = run(lambda h, w: logprobs64(h, w, labels))
    assert_close64(fused, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_gradient_work(backend):
    hidden, weight, labels, _ = make_inputs(20, 8, 64)
    weight.requires_grad_(False)
    for mode in ("in_forward", "recompute"):
        loss = prefuse.linear_cross_entropy(hidden, weight, labels, mode=mode, **backend_kwargs(backend))
        (g,) = torch.autograd.grad(loss, [hidden])
        assert_close64(g, torch.autograd.grad(cross_entropy64(hidden, weight, labels), [hidden])[0])
    assert weight.grad is None


def test_fp64_gradcheck_of_the_torch_backend_chain():
    """The analytic backward (softcap and temperature chain rule) against finite differences of the float64
    reference of the same forward."""
    hidden, weight, labels, b = make_inputs(5, 4, 9, torch.float64, bias=True, ignore_frac=0.0)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=0.8, softcap=1.5, backend="torch")
    g_fused = grads(out, [hidden])[0]
    eps = 1e-6
    num = torch.zeros_like(hidden)
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        for i in range(hidden.numel()):
            for sign in (1, -1):
                h2 = hidden.detach().clone()
                h2.view(-1)[i] += sign * eps
                val = (logprobs64(h2, weight, labels, b, temperature=0.8, softcap=1.5) * r).sum()
                num.view(-1)[i] += sign * val / (2 * eps)
    assert_close64(g_fused, num, rel=1e-4)


@pytest.mark.parametrize("v", [32000, 128256])
def test_large_vocab_torch_backend(v):
    hidden, weight, labels, b = make_inputs(24, 16, v, bias=True, scale=3.0)
    out = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", chunk_size=8,
                                       backend="torch")
    ref = cross_entropy64(hidden, weight, labels, b, reduction="none")
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight]), grads(ref, [hidden, weight])):
        assert_close64(g, r)


@pytest.mark.interpreter
@pytest.mark.heavy
def test_triton_default_tile_at_32k_vocab():
    """The interpreter's default (wide) tile at V=32000: eight 4096-wide tiles per row, the last one partial."""
    hidden, weight, labels, b = make_inputs(8, 16, 32000, bias=True, scale=3.0)
    out = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, label_smoothing=0.1, backend="triton")
    ref = cross_entropy64(hidden, weight, labels, b, label_smoothing=0.1)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_tiles_when_the_budget_is_small(backend):
    """A 64 KB budget leaves 16 whole-vocabulary rows; the recompute path takes 64-row chunks over 256-wide
    vocabulary tiles instead (the last one partial), with logsumexps merged across tiles."""
    from prefuse.kernels.plan import make_plan

    hidden, weight, labels, b = make_inputs(64, 16, 1000, bias=True, scale=2.0)
    plan = make_plan(n_rows=int((labels != -100).sum()), hidden_size=16, vocab=1000, dtype=torch.float32,
                     device=torch.device("cpu"), needs_grad=True, upstream_known=False, chunk_budget_bytes=64000)
    assert plan.vocab_tile == 256 and plan.mode == "recompute"
    kw = dict(chunk_budget_bytes=64000, **backend_kwargs(backend))
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=0.8, softcap=3.0, **kw)
    ref = logprobs64(hidden, weight, labels, b, temperature=0.8, softcap=3.0)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)
    loss = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", label_smoothing=0.1, **kw)
    ref = cross_entropy64(hidden, weight, labels, b, reduction="none", label_smoothing=0.1)
    assert_close64(loss, ref)
    for g, r in zip(grads(loss, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)
