"""The frozen-weight path (only hidden needs a gradient: LoRA, a frozen lm_head): forward forms each row's gradient
basis, backward scales it. It must equal the recompute path and the float64 reference (values and grad_hidden) for
per-token, separable and batch-coupled objectives, on both backends; be taken exactly when the weight and bias need
no gradient; and take two matmuls per chunk where the recompute path takes three.

Tolerances as in test_head_parity: |err| <= 2e-5 * (1 + max|ref|).
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefuse
from prefuse.preference import PreferenceLoss
from tests.reference import cross_entropy64, grads, logprobs64, make_inputs
from tests.test_preference_roles import extras, plain_inputs, scattered_batch, uses_reference

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]


def backend_kwargs(backend):
    return {"backend": backend, **({"block_v": 128} if backend == "triton" else {})}


def assert_close64(got, ref, rel=2e-5):
    scale = 1.0 + ref.double().abs().max().item()
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= rel * scale, (err, rel * scale)


def frozen_inputs(n, h, v, bias=True, **kw):
    hidden, weight, labels, b = make_inputs(n, h, v, bias=bias, **kw)
    weight.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    return hidden, weight, labels, b


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


# -- per-token log-probs --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.7, None), (1.3, 2.0)])
def test_per_token_logprobs_equal_recompute_and_reference(backend, temperature, softcap, chunk_rows):
    """An arbitrary upstream gradient per token (grads draws one): the case no in-forward mode covers."""
    hidden, weight, labels, b = frozen_inputs(37, 16, 300, scale=3.0)
    kw = dict(bias=b, temperature=temperature, softcap=softcap, chunk_size=8, **backend_kwargs(backend))
    out = prefuse.linear_logprobs(hidden, weight, labels, **kw)
    assert chunk_rows and sum(chunk_rows) == int((labels != -100).sum())
    forward_calls = len(chunk_rows)
    (g,) = grads(out, [hidden])
    assert len(chunk_rows) == forward_calls  # backward read no logits chunk: the frozen-weight path ran
    recompute = prefuse.linear_logprobs(hidden, weight, labels, mode="recompute", **kw)
    (g_recompute,) = grads(recompute, [hidden])
    assert len(chunk_rows) == 3 * forward_calls  # the recompute path: forward, then backward's recompute
    ref = logprobs64(hidden, weight, labels, b, temperature=temperature, softcap=softcap)
    (g_ref,) = grads(ref, [hidden])
    assert_close64(out, ref)
    assert torch.equal(out, recompute)  # the same chunks and reductions give the same log-probs
    assert_close64(g, g_ref)
    assert_close64(g, g_recompute)
    assert torch.all(g[labels == -100] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_matmuls_per_chunk_not_three(backend):
    hidden, weight, labels, b = frozen_inputs(48, 16, 200, ignore_frac=0.0)
    chunks = 48 // 8

    def count(mode):
        counter = MatmulCounter()
        with counter:
            out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, mode=mode, chunk_size=8,
                                          **backend_kwargs(backend))
            out.sum().backward()
        hidden.grad = None
        return counter.count

    assert count("auto") == 2 * chunks  # logits, dz @ W
    assert count("recompute") == 3 * chunks  # logits; backward: logits again, dz @ W


# -- vocabulary tiles: the online softmax of the basis ----------------------------------------------------------------

TILED = dict(chunk_budget_bytes=4096)  # 37 rows x 256-wide tiles of V=300 (a whole tile and a 44-wide one)


@pytest.mark.parametrize("temperature,bias", [(1.0, False), (0.7, True)])
def test_vocabulary_tiles_form_the_basis_with_an_online_softmax(temperature, bias):
    """float32 on the CPU takes vocabulary tiles (the row's max and sums carried from tile to tile, the basis
    accumulator rescaled when the max grows): log-probs and grad_hidden equal float64 and the whole-row chunks;
    each tile is two matmuls (its logits, exp @ W), and backward runs none."""
    from prefuse.kernels.plan import make_plan

    hidden, weight, labels, b = frozen_inputs(48, 16, 300, bias=bias, scale=4.0)  # max logits in either tile
    n_rows = int((labels != -100).sum())
    plan = make_plan(n_rows=n_rows, hidden_size=16, vocab=300, dtype=torch.float32, device=torch.device("cpu"),
                     needs_grad=True, upstream_known=False, weight_frozen=True, **TILED)
    assert (plan.mode, plan.rows_per_chunk, plan.vocab_tile) == ("frozen_weight", n_rows, 256)
    kw = dict(bias=b, temperature=temperature, backend="torch")
    with MatmulCounter() as counter:
        out = prefuse.linear_logprobs(hidden, weight, labels, **kw, **TILED)
        (g,) = grads(out, [hidden])
    assert counter.count == 2 * 2  # one row chunk, two tiles: logits and exp @ W_tile each
    whole = prefuse.linear_logprobs(hidden, weight, labels, chunk_size=16, **kw)
    (g_whole,) = grads(whole, [hidden])
    ref = logprobs64(hidden, weight, labels, b, temperature=temperature)
    (g_ref,) = grads(ref, [hidden])
    assert_close64(out, ref)
    assert_close64(g, g_ref)
    assert_close64(out, whole, rel=2e-6)
    assert_close64(g, g_whole, rel=2e-6)
    assert torch.all(g[labels == -100] == 0)


def test_tiles_fall_back_to_whole_rows_where_they_cannot_fold():
    """softcap (its chain rule needs each logit's tanh) takes whole-vocabulary rows in the tiles' buffer."""
    hidden, weight, labels, b = frozen_inputs(48, 16, 300, scale=3.0)
    out = prefuse.linear_logprobs(hidden, weight, labels, softcap=2.0, backend="torch", **TILED)
    (g,) = grads(out, [hidden])
    ref = logprobs64(hidden, weight, labels, softcap=2.0)
    (g_ref,) = grads(ref, [hidden])
    assert_close64(out, ref)
    assert_close64(g, g_ref)


@pytest.mark.parametrize("name", ["sigmoid", "kto", "grpo"])
def test_tiles_with_the_reference_in_the_policys_chunks(name):
    """PreferenceLoss on float32 with tiles: the reference's rows ride in the policy's tiled chunks; loss, metrics
    and grad_hidden equal the recompute path's (float32 rounding) and the policy equal to its reference gets
    rewards of exactly 0."""
    hidden, weight, labels, ref_hidden, roles = scattered_batch(name)
    hidden, weight = hidden.detach().float().requires_grad_(), weight.detach().float()
    ref_kw = {"ref_hidden": ref_hidden.float()} if uses_reference(name) else {}
    extra = extras(name, torch.Generator().manual_seed(1))
    extra = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in extra.items()}
    loss_fn = PreferenceLoss(name, beta=0.2, **TILED)
    loss, metrics = loss_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    assert loss_fn.last_mode == "frozen_weight" and loss_fn.last_shared == bool(ref_kw)
    (g,) = torch.autograd.grad(loss, [hidden])
    recompute_fn = PreferenceLoss(name, beta=0.2, mode="recompute", **TILED)
    loss_rec, metrics_rec = recompute_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    (g_rec,) = torch.autograd.grad(loss_rec, [hidden])
    assert_close64(loss, loss_rec, rel=1e-5)
    for key in metrics:
        assert_close64(metrics[key], metrics_rec[key], rel=1e-5)
    assert g_rec.abs().max() > 0
    assert_close64(g, g_rec, rel=1e-5)
    if name == "sigmoid":
        _, same = loss_fn(hidden, weight, labels, roles=roles, ref_hidden=hidden.detach().clone(), **extra)
        assert same["rewards/chosen"] == 0 and same["rewards/margins"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_taken_exactly_when_only_hidden_needs_a_gradient(backend, chunk_rows):
    def backward_reads_logits(hidden, weight, labels, b, **kw):
        out = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=8, **kw,
                                      **backend_kwargs(backend))
        before = len(chunk_rows)
        out.sum().backward()
        return len(chunk_rows) > before

    hidden, weight, labels, b = make_inputs(30, 8, 64, bias=True)
    assert backward_reads_logits(hidden, weight, labels, b)  # trainable head: recompute
    weight.requires_grad_(False)
    assert backward_reads_logits(hidden, weight, labels, b)  # the bias still needs a gradient
    b.requires_grad_(False)
    assert not backward_reads_logits(hidden, weight, labels, b)  # frozen head: frozen-weight path
    assert backward_reads_logits(hidden, weight, labels, b, mode="recompute")  # overridden
    with torch.no_grad():  # no gradient at all: the plain forward, no basis
        assert not prefuse.linear_logprobs(hidden, weight, labels, bias=b, **backend_kwargs(backend)).requires_grad
    weight.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen_weight"):
        prefuse.linear_logprobs(hidden, weight, labels, mode="frozen_weight", **backend_kwargs(backend))
    with pytest.raises(ValueError, match="in-forward"):
        prefuse.linear_logprobs(hidden, weight, labels, mode="in_forward")


def test_low_precision_tracks_the_recompute_path():
    """bf16: the basis is held in bf16 and scaled once more (two roundings where the recompute path rounds dz once):
    its error against float64 stays within 1.5x the recompute path's plus 1e-2 of the gradient's scale."""
    hidden, weight, labels, b = frozen_inputs(48, 32, 500, scale=2.0)
    hidden = hidden.detach().bfloat16().requires_grad_()
    weight, b = weight.bfloat16(), b.bfloat16()
    fused = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=10, backend="torch")
    recompute = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=10, backend="torch",
                                        mode="recompute")
    truth = logprobs64(hidden, weight, labels, b)
    (g,), (g_rec,), (g_ref,) = grads(fused, [hidden]), grads(recompute, [hidden]), grads(truth, [hidden])
    assert g.dtype == torch.bfloat16 and torch.equal(fused, recompute)
    err = (g.double() - g_ref).abs().max().item()
    assert err <= 1.5 * (g_rec.double() - g_ref).abs().max().item() + 1e-2 * (1 + g_ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_stats_come_from_the_same_chunks(backend):
    hidden, weight, labels, b = frozen_inputs(25, 8, 90)
    logp, stats = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=6, return_stats=True,
                                          top_k=4, **backend_kwargs(backend))
    ref_logp, ref_stats = prefuse.linear_logprobs(hidden, weight, labels, bias=b, chunk_size=6, return_stats=True,
                                                  top_k=4, mode="recompute", **backend_kwargs(backend))
    assert torch.equal(logp, ref_logp)
    for name in ("entropy", "topk_mass", "logsumexp"):
        assert torch.equal(getattr(stats, name), getattr(ref_stats, name)), name
    assert_close64(grads(logp, [hidden])[0], grads(logprobs64(hidden, weight, labels, b), [hidden])[0])


def test_cross_entropy_per_token_takes_it_and_label_smoothing_is_refused(chunk_rows):
    hidden, weight, labels, b = frozen_inputs(40, 16, 200)
    loss = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", chunk_size=9)
    forward_calls = len(chunk_rows)
    (g,) = grads(loss, [hidden])
    assert len(chunk_rows) == forward_calls  # no recompute
    ref = cross_entropy64(hidden, weight, labels, b, reduction="none")
    assert_close64(loss, ref)
    assert_close64(g, grads(ref, [hidden])[0])
    with pytest.raises(ValueError, match="label_smoothing"):
        prefuse.linear_cross_entropy(hidden, weight, labels, mode="frozen_weight", label_smoothing=0.1)
    # with smoothing, auto keeps the other modes and stays right
    smooth = prefuse.linear_cross_entropy(hidden, weight, labels, bias=b, reduction="none", label_smoothing=0.1)
    assert_close64(smooth, cross_entropy64(hidden, weight, labels, b, reduction="none", label_smoothing=0.1))


def test_backward_twice_is_a_clear_error():
    hidden, weight, labels, _ = frozen_inputs(10, 8, 20, bias=False)
    out = prefuse.linear_logprobs(hidden, weight, labels, backend="torch").sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute"):
        out.backward()


# -- preference objectives ------------------------------------------------------------------------------------------

def check_objective(name, backend, temperature=1.0, softcap=None):
    """PreferenceLoss with a frozen head: auto takes frozen_weight; loss, metrics and grad_hidden equal the recompute
    path's and the float64 plain path's."""
    hidden, weight, labels, ref_hidden, roles = scattered_batch(name)
    weight.requires_grad_(False)
    extra = extras(name, torch.Generator().manual_seed(1))
    ref_kw = {"ref_hidden": ref_hidden} if uses_reference(name) else {}
    head = dict(beta=0.2, backend=backend, chunk_size=10, temperature=temperature, softcap=softcap)
    loss_fn = PreferenceLoss(name, **head)
    loss, metrics = loss_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    assert loss_fn.last_mode == "frozen_weight"
    assert loss_fn.last_shared == bool(ref_kw)  # the reference (the same head) rides in the policy's chunks
    (g,) = torch.autograd.grad(loss, [hidden])
    separate_fn = PreferenceLoss(name, share_reference_chunks=False, **head)
    loss_sep, metrics_sep = separate_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    assert separate_fn.last_mode == "frozen_weight" and not separate_fn.last_shared
    (g_sep,) = torch.autograd.grad(loss_sep, [hidden])
    recompute_fn = PreferenceLoss(name, mode="recompute", **head)
    loss_rec, metrics_rec = recompute_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    assert recompute_fn.last_mode == "recompute"
    (g_rec,) = torch.autograd.grad(loss_rec, [hidden])
    # shared chunks: the same values up to the float32 rounding of each log-prob (another op computes them)
    assert_close64(loss, loss_sep, rel=1e-6)
    for key in metrics:
        assert_close64(metrics[key], metrics_sep[key], rel=1e-6)
    assert_close64(g, g_sep, rel=1e-6)
    loss, metrics, g = loss_sep, metrics_sep, g_sep  # the separate passes: bitwise the recompute path's values
    if temperature == 1.0 and softcap is None:
        plain, plain_metrics = prefuse.objective_loss(
            name, beta=0.2, **plain_inputs(name, hidden, weight, labels, ref_hidden, roles), **extra)
        (g_plain,) = torch.autograd.grad(plain, [hidden])
        assert_close64(loss, plain)
        for key, value in plain_metrics.items():
            assert_close64(metrics[key], value)
        assert g_plain.abs().max() > 0  # the objective reaches the head: the comparison can fail
        assert_close64(g, g_plain)
    assert torch.equal(loss, loss_rec)
    assert all(torch.equal(metrics[k], metrics_rec[k]) for k in metrics)
    assert_close64(g, g_rec)


@pytest.mark.parametrize("name", prefuse.list_objectives())
def test_every_objective_frozen_weight(name):
    """Separable (sigmoid, ...), batch-coupled (kto's KL point, aot's sorting) and token-level ones alike."""
    check_objective(name, "torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["sigmoid", "aot", "kto"])
def test_separable_and_batch_coupled_on_both_backends(name, backend):
    assert prefuse.get_objective(name).separable == (name == "sigmoid")
    check_objective(name, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_with_softcap_and_temperature(backend):
    check_objective("kto", backend, temperature=0.8, softcap=3.0)
    # and against float64 directly: the policy's chosen log-probs under the transform
    hidden, weight, labels, ref_hidden, roles = scattered_batch("sigmoid")
    weight.requires_grad_(False)
    loss_fn = PreferenceLoss("sigmoid", beta=0.2, backend=backend, chunk_size=10, temperature=0.8, softcap=3.0)
    _, _, inputs = loss_fn(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden, return_inputs=True)
    want = logprobs64(hidden, weight, labels, temperature=0.8, softcap=3.0).sum(-1)[roles["chosen"]]
    assert_close64(inputs["policy_chosen_logps"], want)


def test_modes_of_preference_loss_with_a_frozen_head():
    hidden, weight, labels, ref_hidden, roles = scattered_batch("sigmoid")
    loss_fn = PreferenceLoss("sigmoid", mode="frozen_weight")
    with pytest.raises(ValueError, match="frozen_weight"):  # the weight still needs a gradient
        loss_fn(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    weight.requires_grad_(False)
    loss_fn(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    assert loss_fn.last_mode == "frozen_weight"
    in_forward = PreferenceLoss("sigmoid", mode="in_forward")  # still available when asked for
    in_forward(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    assert in_forward.last_mode == "in_forward"
    auto = PreferenceLoss("sigmoid")
    with torch.no_grad():
        auto(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    assert auto.last_mode == "forward_only"


@pytest.mark.parametrize("share", [True, False])
def test_policy_equal_to_reference_gives_exactly_zero_rewards(share):
    """The reference (no gradient) runs over the frozen-weight plan's chunks, inside the policy's (share) or as a
    plain forward of its own: bitwise equal."""
    hidden, weight, labels, _, roles = scattered_batch("sigmoid")
    hidden, weight = hidden.detach().float().requires_grad_(), weight.detach().float()
    loss_fn = PreferenceLoss("sigmoid", share_reference_chunks=share)
    _, metrics = loss_fn(hidden, weight, labels, roles=roles, ref_hidden=hidden.detach().clone())
    assert loss_fn.last_mode == "frozen_weight" and loss_fn.last_shared == share
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_reference_chunks_take_two_matmuls_per_chunk_not_three(backend):
    """LoRA's reference uses the policy's lm_head: its rows ride in the policy's chunks (one logits matmul for
    both, one basis matmul for the policy's rows); separately it is a third matmul per chunk. A different
    reference head (ref_weight of its own) is never shared."""
    hidden, weight, labels, ref_hidden, roles = scattered_batch("sigmoid")
    hidden, weight, ref_hidden = hidden.detach().float().requires_grad_(), weight.detach().float(), ref_hidden.float()
    n_rows = int((labels[torch.cat([roles["chosen"], roles["rejected"]])] != -100).sum())
    chunks = -(-n_rows // 10)
    counts = {}
    for share in (True, False):
        loss_fn = PreferenceLoss("sigmoid", chunk_size=10, share_reference_chunks=share, backend=backend)
        with MatmulCounter() as counter:
            loss, _ = loss_fn(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
            loss.backward()
        counts[share] = counter.count
    assert counts == {True: 2 * chunks, False: 3 * chunks}
    own = PreferenceLoss("sigmoid", chunk_size=10)
    own(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden, ref_weight=weight.clone())
    assert own.last_mode == "frozen_weight" and not own.last_shared


# -- LoRA end to end ------------------------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread", "offline_hf_home")
def test_lora_gradients_through_hidden_equal_the_recompute_path():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                      tie_word_embeddings=False)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(config),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
    model.eval()
    ids = torch.randint(1, 128, (4, 12))
    labels = ids.roll(-1, dims=1)
    labels[:, :4] = -100
    labels[:, -1] = -100
    head = model.get_output_embeddings()
    assert not head.weight.requires_grad  # LoRA leaves the lm_head frozen

    def lora_grads(mode):
        model.zero_grad()
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        with torch.no_grad(), model.disable_adapter():
            ref_hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        loss_fn = PreferenceLoss("sigmoid", beta=0.5, mode=mode, chunk_size=8)
        loss, _ = loss_fn(hidden, head.weight, labels, ref_hidden=ref_hidden, ref_weight=head.weight.detach())
        loss.backward()
        assert loss_fn.last_mode == ("frozen_weight" if mode == "auto" else mode)
        assert loss_fn.last_shared == (mode == "auto")  # the engine's ref_weight: the same head, detached
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, got = lora_grads("auto")
    loss_rec, want = lora_grads("recompute")
    assert_close64(loss, loss_rec, rel=1e-6)  # the reference's log-probs from the shared chunks' op
    assert got.keys() == want.keys() and len(got) == 8  # 2 layers x q, v x A, B
    assert head.weight.grad is None
    for name in got:
        assert want[name].abs().max() > 0, name
        assert_close64(got[name], want[name], rel=1e-5)
