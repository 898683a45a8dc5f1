"""Temperature as a tensor: one value per sequence [S] or per token [S, T] in every entry point of the fused head,
against a plain float64 computation of the definition, log_softmax(logits / t[..., None]) on the materialized
logits, with its gradients (hidden, weight, bias) from torch.autograd in float64.

Tolerances as in test_head_parity (the head works in float32): |err| <= 2e-5 * (1 + |ref|) for values and
2e-5 * (1 + max|ref grad|) for gradients. The temperatures span [0.3, 1.8], so a row's logits scale by up to ~3.3.
"""
import pytest
import torch

import prefuse
from prefuse.heads import Head, reference_logps, sequence_logps
from prefuse.kernels import group_rows, grouped_logprobs, grouped_logprobs_shared
from tests.reference import cross_entropy64, grads, logprobs64, make_inputs, token_stats64

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
S, T, H, V = 5, 7, 16, 300
TILED = {"chunk_budget_bytes": 4096}  # 256-wide vocabulary tiles of V=300 (test_head_frozen_weight's TILED)


def backend_kwargs(backend):
    return {"backend": backend, **({"block_v": 128} if backend == "triton" else {})}


def assert_close64(got, ref, rel=2e-5):
    scale = 1.0 + ref.double().abs().max().item() if ref.numel() else 1.0
    err = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    assert err <= rel * scale, (err, rel * scale)


def temperatures(shape, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (0.3 + 1.5 * torch.rand(shape, generator=gen, dtype=torch.float64)).float()


def per_position(t, lead=(S, T)):
    """t [S] or [S, T] -> float64 [S, T, 1], the divisor of the reference's logits."""
    t = t.double()
    return t.reshape(tuple(t.shape) + (1,) * (len(lead) - t.dim())).expand(lead)[..., None]


def inputs(bias=True, scale=2.0, seed=0):
    return make_inputs(0, H, V, bias=bias, lead=(S, T), scale=scale, seed=seed)


# -- linear_logprobs: every mode ------------------------------------------------------------------------------------

LOGPROBS_CASES = {
    "recompute": {"mode": "recompute"},
    "recompute_tiles": {"mode": "recompute", **TILED},
    "recompute_chunks_softcap": {"mode": "recompute", "chunk_size": 5, "softcap": 3.0},
}
FROZEN_CASES = {"frozen_weight": {}, "frozen_tiles": TILED, "frozen_chunks_softcap": {"chunk_size": 5, "softcap": 3.0}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per", ["sequence", "token"])
@pytest.mark.parametrize("case", list(LOGPROBS_CASES))
def test_linear_logprobs_per_row_temperature(backend, per, case):
    hidden, weight, labels, b = inputs()
    t = temperatures((S,) if per == "sequence" else (S, T))
    kw = dict(LOGPROBS_CASES[case])
    softcap = kw.pop("softcap", None)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=t, softcap=softcap, **kw,
                                  **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels, b, temperature=per_position(t), softcap=softcap)
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FROZEN_CASES))
def test_frozen_weight_per_row_temperature(backend, case, chunk_rows):
    hidden, weight, labels, b = inputs()
    weight, b = weight.detach(), b.detach()
    t = temperatures((S, T))
    kw = dict(FROZEN_CASES[case])
    softcap = kw.pop("softcap", None)
    out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=t, softcap=softcap, mode="frozen_weight",
                                  **kw, **backend_kwargs(backend))
    ref = logprobs64(hidden, weight, labels, b, temperature=per_position(t), softcap=softcap)
    assert_close64(out, ref)
    assert_close64(grads(out, [hidden])[0], grads(ref, [hidden])[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("reduction,smoothing", [("mean", 0.0), ("sum", 0.1), ("none", 0.0)])
def test_linear_cross_entropy_per_row_temperature(backend, mode, reduction, smoothing):
    hidden, weight, labels, b = inputs()
    t = temperatures((S,))
    out = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, temperature=t, mode=mode, reduction=reduction,
                                       label_smoothing=smoothing, **backend_kwargs(backend))
    ref = cross_entropy64(hidden, weight, labels, b, reduction=reduction, label_smoothing=smoothing,
                          temperature=per_position(t))
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


def test_vocab_tiles_per_row_cross_entropy():
    hidden, weight, labels, b = inputs()
    t = temperatures((S, T))
    out = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, temperature=t, reduction="none",
                                       label_smoothing=0.1, backend="torch", **TILED)
    ref = cross_entropy64(hidden, weight, labels, b, reduction="none", label_smoothing=0.1,
                          temperature=per_position(t))
    assert_close64(out, ref)
    for g, r in zip(grads(out, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_per_row_temperature(backend):
    """Two sequences (the statistics kernel's running top-k is slow under the interpreter)."""
    hidden, weight, labels, b = inputs()
    hidden, labels = hidden[:2], labels[:2]
    t = temperatures((2,))
    stats = prefuse.linear_token_stats(hidden.detach(), weight.detach(), labels, bias=b.detach(), temperature=t,
                                       **backend_kwargs(backend))
    ref = token_stats64(hidden, weight, labels.clamp(min=0), b, temperature=per_position(t, (2, T)))
    keep = labels != -100
    for name in ("logsumexp", "entropy", "log_sum_sq_probs", "topk_mass", "logprobs"):
        assert_close64(getattr(stats, name)[keep], ref[name].detach()[keep])


def test_ignored_rows_drop_their_temperatures():
    """Rows with ignore_index leave the head before the matmul; the temperatures of the kept rows must stay with
    them: a temperature changed only at ignored positions changes nothing, one changed at a kept position does."""
    hidden, weight, labels, b = inputs()
    t = temperatures((S, T))
    base = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=t, backend="torch")
    ignored, kept = (labels == -100).nonzero()[0], (labels != -100).nonzero()[-1]
    moved = t.clone()
    moved[tuple(ignored)] = 50.0
    assert torch.equal(prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=moved, backend="torch"),
                       base)
    moved[tuple(kept)] = 50.0
    other = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=moved, backend="torch")
    assert not torch.equal(other[tuple(kept)], base[tuple(kept)])


def test_equal_values_match_the_scalar_path():
    hidden, weight, labels, b = inputs()
    scalar = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=0.7, backend="torch")
    tensor = prefuse.linear_logprobs(hidden, weight, labels, bias=b, temperature=torch.full((S,), 0.7),
                                     backend="torch")
    assert_close64(tensor, scalar, rel=2e-6)
    for g, r in zip(grads(tensor, [hidden, weight, b]), grads(scalar, [hidden, weight, b])):
        assert_close64(g, r, rel=2e-6)


# -- the grouped head and the helpers -------------------------------------------------------------------------------

def _rows(labels, mode, weight_frozen=False, grouped=True):
    groups = torch.tensor([0, 1, 0, 1, -1])  # the last sequence is read by no group: its rows are dropped
    return group_rows(labels, groups, vocab=V, hidden_size=H, dtype=torch.float32, needs_grad=True, grouped=grouped,
                      mode=mode, weight_frozen=weight_frozen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["recompute", "frozen_weight", "in_forward"])
def test_grouped_logprobs_per_row_temperature(backend, mode):
    hidden, weight, labels, b = inputs()
    if mode == "frozen_weight":
        weight, b = weight.detach(), b.detach()
    t = temperatures((S,))
    rows = _rows(labels, mode, weight_frozen=mode == "frozen_weight")
    assert rows.plan.mode == mode
    ref = logprobs64(hidden, weight, labels, b, temperature=per_position(t)).reshape(-1)[rows.index]
    coef = torch.randn(rows.n_rows, dtype=torch.float64)
    params = [hidden] if mode == "frozen_weight" else [hidden, weight, b]
    want = torch.autograd.grad((ref * coef).sum(), params)
    kw = dict(bias=b, temperature=t, backend=backend)  # the grouped head takes no block_v
    if mode == "in_forward":
        surrogate, logp = grouped_logprobs(hidden, weight, rows, coef_fn=lambda chunk, lp: coef[chunk].float(), **kw)
        got = torch.autograd.grad(surrogate, params)
    else:
        logp = grouped_logprobs(hidden, weight, rows, **kw)
        got = torch.autograd.grad((logp * coef.float()).sum(), params)
    assert_close64(logp, ref)
    for g, r in zip(got, want):
        assert_close64(g, r)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_shared_reference_per_row_temperature(backend):
    hidden, weight, labels, b = inputs()
    ref_hidden = inputs(seed=3)[0].detach()
    weight, b = weight.detach(), b.detach()
    t = temperatures((S, T))
    rows = _rows(labels, "auto", weight_frozen=True)
    logp, ref_logp = grouped_logprobs_shared(hidden, ref_hidden, weight, rows, bias=b, temperature=t,
                                             backend=backend)
    want = logprobs64(hidden, weight, labels, b, temperature=per_position(t)).reshape(-1)[rows.index]
    want_ref = logprobs64(ref_hidden, weight, labels, b, temperature=per_position(t)).reshape(-1)[rows.index]
    assert_close64(logp, want)
    assert_close64(ref_logp, want_ref)
    assert_close64(grads(logp, [hidden])[0], grads(want, [hidden])[0])


def test_head_helpers_take_per_sequence_temperatures():
    hidden, weight, labels, b = inputs()
    t = temperatures((S,))
    head = Head(weight, b)
    sums, counts = sequence_logps(hidden, head, labels, temperature=t, backend="torch")
    assert torch.equal(counts, (labels != -100).sum(-1))
    ref = logprobs64(hidden, weight, labels, b, temperature=per_position(t)).sum(-1)
    assert_close64(sums, ref)
    for g, r in zip(grads(sums, [hidden, weight, b]), grads(ref, [hidden, weight, b])):
        assert_close64(g, r)
    assert_close64(reference_logps(hidden, head, labels, temperature=t, backend="torch"), ref.detach())


# -- validation -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,match", [
    (torch.ones(T), "shape"),                       # [T] is not a leading part of [S, T]
    (torch.ones(S, T, 1, 1), "shape"),
    (torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0]), "finite number > 0"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0]), "finite number > 0"),
    (torch.ones(S, dtype=torch.long), "floating"),
    (torch.ones(S, requires_grad=True), "detach"),
])
def test_bad_temperature_tensors_are_refused_in_one_line(bad, match):
    hidden, weight, labels, b = inputs()
    for call in (prefuse.linear_logprobs, prefuse.linear_cross_entropy):
        with pytest.raises(ValueError, match=match) as info:
            call(hidden, weight, labels, bias=b, temperature=bad, backend="torch")
        assert str(info.value).startswith("temperature:") and "\n" not in str(info.value)


# -- PreferenceLoss: a call's own temperature per sequence ----------------------------------------------------------

def dpo64(hidden, weight, ref_hidden, labels, t, beta):
    """sigmoid DPO in float64 from its definition, every row's logits divided by its sequence's temperature."""
    policy = logprobs64(hidden, weight, labels, temperature=per_position(t, labels.shape)).sum(-1)
    ref = logprobs64(ref_hidden, weight.detach(), labels, temperature=per_position(t, labels.shape)).sum(-1)
    b = hidden.shape[0] // 2
    margin = policy - ref
    return -torch.nn.functional.logsigmoid(beta * (margin[:b] - margin[b:])).mean()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute", "frozen_weight"])
def test_preference_loss_per_sequence_temperature(backend, mode):
    from prefuse.preference import PreferenceLoss

    hidden, weight, labels, _ = make_inputs(0, H, V, lead=(4, T), scale=2.0)
    ref_hidden = make_inputs(0, H, V, lead=(4, T), scale=2.0, seed=7)[0].detach()
    if mode == "frozen_weight":
        weight.requires_grad_(False)
    t = temperatures((4,))
    want = dpo64(hidden, weight, ref_hidden, labels, t, beta=0.3)
    params = [hidden] if mode == "frozen_weight" else [hidden, weight]
    want_grads = torch.autograd.grad(want, params)
    fn = PreferenceLoss("sigmoid", beta=0.3, mode=mode, backend=backend)
    loss, _ = fn(hidden, weight, labels, ref_hidden=ref_hidden, temperature=t)
    assert fn.last_mode == mode
    assert_close64(loss.detach(), want.detach())
    for g, r in zip(torch.autograd.grad(loss, params), want_grads):
        assert_close64(g, r)
    with pytest.raises(ValueError, match="^temperature: shape"):
        fn(hidden, weight, labels, ref_hidden=ref_hidden, temperature=torch.ones(T + 1))


def test_vocab_parallel_head_refuses_a_temperature_of_the_wrong_shape():
    """The vocabulary-parallel head takes per-row temperatures (tests/test_vocab_parallel.py, against float64);
    one of the wrong shape is refused in one line before any collective (no process group here)."""
    from prefuse.kernels.vocab_parallel import vocab_parallel_logprobs

    hidden, weight, labels, _ = inputs()
    with pytest.raises(ValueError, match="^temperature: shape") as info:
        vocab_parallel_logprobs(hidden, weight, labels, vocab_start=0, temperature=torch.ones(S + 1))
    assert "\n" not in str(info.value)
