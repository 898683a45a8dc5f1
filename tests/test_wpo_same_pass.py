"""WPO's per-token log sum_v p(v)^2 comes from the grouped head's own log-prob pass (log_sum_sq_out): the same
logits chunks, summed under the logsumexp's running max, no matmul of its own.

- grouped_logprobs(log_sum_sq_out=...) on every plan (in_forward, recompute over whole rows and over vocabulary
  tiles, frozen_weight whole rows, tiles and softcap, the reference in the policy's chunks, forward only), both
  backends, against log(sum_v softmax(z)_v^2) computed in float64 on the materialized logits;
- PreferenceLoss(use_weighting=True) runs as many head matmuls (forward and backward) as without it, in every mode.
The loss values against TRL's own code are in tests/test_preference_wpo.py.

Tolerance: 2e-5 * (1 + max|ref|) (float32 head against float64)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefuse.kernels import group_rows, grouped_logprobs, grouped_logprobs_shared
from prefuse.preference import PreferenceLoss
from tests.reference import logits64, make_inputs

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
S, T, H, V = 6, 9, 16, 300


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products (aten mm / addmm / bmm) run under it, forward and backward alike."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def backend_kwargs(backend):
    """The grouped head takes no block_v: under the interpreter one 512-wide tile spans V=300 (the tiles' merge
    under the running max is tested on the kernel itself below, with 128-wide tiles)."""
    return {"backend": backend}


def log_sum_sq64(hidden, weight, bias=None, temperature=1.0, softcap=None):
    """log sum_v p(v)^2 [...] in float64 from the definition, p = softmax of the transformed logits."""
    p = torch.softmax(logits64(hidden, weight, bias, temperature, softcap), dim=-1)
    return torch.log((p * p).sum(-1))


def assert_close64(got, ref, rel=2e-5):
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * (1 + ref.double().abs().max().item()), err


# plan name -> (group_rows options, head options, weight frozen)
PLANS = {
    "in_forward": ({"mode": "in_forward"}, {}, False),
    "recompute": ({"mode": "recompute"}, {}, False),
    "recompute_tiles": ({"mode": "recompute", "chunk_budget_bytes": 4096}, {}, False),
    "frozen_weight": ({"mode": "frozen_weight", "chunk_size": 8}, {}, True),
    "frozen_tiles": ({"mode": "frozen_weight", "chunk_budget_bytes": 4096}, {}, True),
    "frozen_softcap": ({"mode": "frozen_weight", "chunk_budget_bytes": 4096}, {"softcap": 3.0}, True),
    "forward_only": ({"mode": "auto"}, {}, None),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("plan", list(PLANS))
def test_log_sum_sq_from_the_log_prob_pass(backend, plan):
    group_kw, head_kw, frozen = PLANS[plan]
    hidden, weight, labels, b = make_inputs(0, H, V, bias=True, lead=(S, T), scale=3.0)
    if frozen:
        weight.requires_grad_(False)
        b.requires_grad_(False)
    groups = torch.tensor([0, 1, 2, 0, 1, -1])
    needs_grad = frozen is not None
    rows = group_rows(labels, groups, vocab=V, hidden_size=H, dtype=torch.float32, needs_grad=needs_grad,
                      weight_frozen=bool(frozen), **group_kw)
    expected_mode = {"in_forward": "in_forward", "forward_only": "forward_only"}.get(
        plan, "frozen_weight" if frozen else "recompute")
    assert rows.plan.mode == expected_mode
    if "tiles" in plan:
        assert rows.plan.vocab_tile is not None and rows.plan.vocab_tile < V
    temperature = 0.8
    want = log_sum_sq64(hidden, weight, b, temperature, head_kw.get("softcap")).reshape(-1)[rows.index]
    out = torch.full((rows.n_rows,), float("nan"))
    kw = dict(bias=b, temperature=temperature, log_sum_sq_out=out, **head_kw, **backend_kwargs(backend))
    if plan == "in_forward":
        seen = []

        def coef_fn(chunk, lp):  # the chunk's rows are written before its coefficients are asked for
            seen.append(bool(torch.isfinite(out[chunk]).all()))
            return torch.ones_like(lp)

        grouped_logprobs(hidden, weight, rows, coef_fn=coef_fn, **kw)
        assert seen and all(seen)
    elif plan == "forward_only":
        with torch.no_grad():
            grouped_logprobs(hidden, weight, rows, **kw)
    else:
        grouped_logprobs(hidden, weight, rows, **kw)
    assert_close64(out, want.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_sum_sq_with_the_reference_in_the_policys_chunks(backend):
    hidden, weight, labels, b = make_inputs(0, H, V, bias=True, lead=(S, T), scale=3.0)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    ref_hidden = make_inputs(0, H, V, lead=(S, T), scale=3.0, seed=5)[0].detach()
    rows = group_rows(labels, torch.zeros(S, dtype=torch.long), vocab=V, hidden_size=H, dtype=torch.float32,
                      needs_grad=True, weight_frozen=True, mode="frozen_weight", chunk_size=8)
    out = torch.zeros(rows.n_rows)
    grouped_logprobs_shared(hidden, ref_hidden, weight, rows, bias=b, log_sum_sq_out=out, **backend_kwargs(backend))
    # the policy's rows, not the reference's stacked beside them
    assert_close64(out, log_sum_sq64(hidden, weight, b).reshape(-1)[rows.index].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_at_large_logits(backend):
    """|z| ~ 1e4 (a naive exp overflows): the sum of squares is taken under the running max, so the value stays
    within float32 of float64 on whole-vocabulary rows."""
    hidden, weight, labels, _ = make_inputs(0, 8, V, lead=(4, 5), scale=3e3, seed=3)
    with torch.no_grad():
        assert (hidden @ weight.t()).abs().max() > 5e3
    rows = group_rows(labels, torch.zeros(4, dtype=torch.long), vocab=V, hidden_size=8, dtype=torch.float32,
                      needs_grad=True, mode="recompute")
    out = torch.zeros(rows.n_rows)
    grouped_logprobs(hidden, weight, rows, log_sum_sq_out=out, **backend_kwargs(backend))
    want = log_sum_sq64(hidden, weight).reshape(-1)[rows.index]
    assert torch.isfinite(out).all()
    assert_close64(out, want.detach())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_row", [False, True])
def test_chunk_op_streams_the_sum_of_squares_over_vocabulary_tiles(backend, per_row):
    """The chunk op itself (torch_ops / triton_ops.logits_forward with log_sum_sq_out): the Triton kernel over
    three 128-wide tiles of V=300 (the sum rescaled by exp(2 (old max - new max)) as the max grows), a scalar or
    a per-row inverse temperature, large logits in some rows."""
    from prefuse.kernels import torch_ops

    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(9, V, generator=gen) * torch.tensor([1.0, 30.0, 300.0]).repeat(3)[:, None]
    logits[2, 290] = 2e3  # the max in the last tile
    labels = torch.randint(0, V, (9,), generator=gen)
    inv_t = (0.5 + torch.rand(9, generator=gen)) if per_row else 0.8
    want = torch.log((torch.softmax(logits.double() * (inv_t.double()[:, None] if per_row else inv_t), -1) ** 2)
                     .sum(-1))
    if backend == "triton":
        from prefuse.kernels import triton_ops as ops
        kw = {"block_v": 128}
    else:
        ops, kw = torch_ops, {}
    out = torch.full((9,), float("nan"))
    logp, _, _ = ops.logits_forward(logits.clone(), labels, inv_temperature=inv_t, log_sum_sq_out=out, **kw)
    assert_close64(out, want)
    plain, _, _ = ops.logits_forward(logits.clone(), labels, inv_temperature=inv_t, **kw)
    assert torch.equal(logp, plain)  # the log-probs do not change


def test_bad_output_buffer_is_refused():
    hidden, weight, labels, _ = make_inputs(0, H, V, lead=(S, T))
    rows = group_rows(labels, torch.zeros(S, dtype=torch.long), vocab=V, hidden_size=H, dtype=torch.float32,
                      needs_grad=True)
    with pytest.raises(ValueError, match="log_sum_sq_out"):
        grouped_logprobs(hidden, weight, rows, log_sum_sq_out=torch.zeros(rows.n_rows + 1), backend="torch")


# -- PreferenceLoss: no pass of its own ------------------------------------------------------------------------------

MODES = ["in_forward", "recompute", "frozen_weight", "shared", "no_grad", "lora_lm_head_in_forward",
         "lora_lm_head_recompute"]


def preference_inputs():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).requires_grad_()
    ref_hidden = torch.randn(4, 8, H, generator=gen)
    labels = torch.randint(0, V, (4, 8), generator=gen)
    labels[:, :3] = -100
    return hidden, weight, ref_hidden, labels


def run(mode, use_weighting):
    hidden, weight, ref_hidden, labels = preference_inputs()
    loss_mode = {"shared": "frozen_weight", "no_grad": "auto"}.get(mode, mode.removeprefix("lora_lm_head_"))
    fn = PreferenceLoss("sigmoid", beta=0.1, mode=loss_mode, backend="torch", chunk_size=10,
                        share_reference_chunks=mode == "shared", use_weighting=use_weighting)
    w = weight.detach() if mode in ("frozen_weight", "shared") or mode.startswith("lora") else weight
    extra = {}
    if mode.startswith("lora"):  # LoRA on the lm_head: u = h A^T, factor B, both trained
        gen = torch.Generator().manual_seed(1)
        a = (torch.randn(3, H, generator=gen) / H ** 0.5).requires_grad_()
        b = (torch.randn(V, 3, generator=gen) * 0.1).requires_grad_()
        extra["low_rank"] = (hidden @ a.T, b)
    with MatmulCounter() as counter:
        if mode == "no_grad":
            with torch.no_grad():
                loss, _ = fn(hidden, w, labels, ref_hidden=ref_hidden)
        else:
            loss, _ = fn(hidden, w, labels, ref_hidden=ref_hidden, **extra)
            loss.backward()
    assert fn.last_shared == (mode == "shared")
    return counter.count, loss.detach()


@pytest.mark.parametrize("mode", MODES)
def test_use_weighting_runs_no_extra_matmul(mode):
    plain, plain_loss = run(mode, False)
    weighted, weighted_loss = run(mode, True)
    assert plain > 0 and weighted == plain
    assert not torch.equal(plain_loss, weighted_loss)  # the weights are in the loss
