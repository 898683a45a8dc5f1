"""prefuse.compat.liger against the real Liger-Kernel 0.8.5 classes, constructed with the same arguments.

Liger's chunked losses are plain torch, so they run here (with compiled=False: a CPU compile costs ~20 s). Both
compute the per-token log-probs in float32 (Liger casts the logits with .float(); prefuse's head returns float32),
even for float64 inputs, so both dtypes are compared at float32 accuracy. Tolerances, relative to the larger of 1
and the largest |value| (loss, aux outputs) or to the largest |gradient| (input, weight, bias):
- values: 1e-5 (measured: at most 2e-6; the log-prob sums span ~-30, where a float32 ulp is ~2e-6);
- gradients: 1e-4 (measured: at most 3e-6, except discopop at 3e-5: its mixing weight sigmoid(beta*margin/tau)
  magnifies the float32 rounding of the margin by beta/tau = 5; against float64 truth prefuse's error there is the
  smaller of the two).
The ipo loss type (prefuse only) is checked against a plain float64 formula with the same tolerances.
"""
import inspect

import pytest
import torch

liger = pytest.importorskip("liger_kernel.chunked_loss")

from prefuse.compat import liger as compat  # noqa: E402

B, T, H, V = 3, 7, 16, 37  # pairs, positions, hidden size, an odd vocabulary
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
CLASSES = ["LigerFusedLinearDPOLoss", "LigerFusedLinearCPOLoss", "LigerFusedLinearSimPOLoss",
           "LigerFusedLinearORPOLoss", "LigerFusedLinearKTOLoss"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(dtype, ignore_index=-100, rows=2 * B):
    """Random head inputs: hidden [rows, T, H], weight [V, H], bias [V], labels [rows, T] with a 2-token prompt
    ignored everywhere and padding on some rows; the reference is a perturbed copy of the policy."""
    hidden = torch.randn(rows, T, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype) * 0.3
    bias = torch.randn(V, dtype=dtype) * 0.1
    labels = torch.randint(0, V, (rows, T))
    labels[:, :2] = ignore_index
    labels[1, 5:] = ignore_index
    labels[rows - 1, 4:] = ignore_index
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels,
                ref_hidden=hidden + 0.1 * torch.randn_like(hidden), ref_weight=weight + 0.01 * torch.randn_like(weight),
                ref_bias=bias + 0.01 * torch.randn_like(bias))


def run(module, call, inputs, with_bias, upstream=1.0):
    """Forward and backward of `module` on leaf copies; returns (loss, aux, [grad_input, grad_weight, grad_bias]).

    call(module, hidden, weight, bias, inputs) runs the forward in the class's own argument order."""
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"].clone().requires_grad_()
    bias = inputs["bias"].clone().requires_grad_() if with_bias else None
    loss, aux = call(module, hidden, weight, bias, inputs)
    (loss * upstream).backward()
    return loss.detach(), aux, [hidden.grad, weight.grad, None if bias is None else bias.grad]


def assert_same(got, want, tol, what):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    assert error <= tol * scale, f"{what}: max |prefuse - liger| = {error:.3g} > {tol * scale:.3g}"


def compare(name, kwargs, call, dtype, with_bias=True, upstream=1.0, rows=2 * B):
    """Same inputs and arguments to Liger's class and prefuse's: loss, aux outputs and gradients agree."""
    inputs = make_inputs(dtype, kwargs.get("ignore_index", -100), rows)
    want_loss, want_aux, want_grads = run(getattr(liger, name)(**kwargs, compiled=False), call, inputs, with_bias,
                                          upstream)
    got_loss, got_aux, got_grads = run(getattr(compat, name)(**kwargs), call, inputs, with_bias, upstream)
    tol = TOLERANCE
    assert_same(got_loss, want_loss, tol, "loss")
    assert len(got_aux) == len(want_aux), f"{len(got_aux)} aux outputs, Liger has {len(want_aux)}"
    for index, (got, want) in enumerate(zip(got_aux, want_aux)):
        assert not got.requires_grad, f"aux output {index} carries a graph"
        assert_same(got, want, tol, f"aux output {index}")
    for what, got, want in zip(("grad input", "grad weight", "grad bias"), got_grads, want_grads):
        if want is None:
            assert got is None, f"{what}: prefuse gave a gradient, Liger none"
            continue
        scale = want.abs().max().item()
        error = (got - want).abs().max().item()
        assert error <= GRAD_TOLERANCE * scale, f"{what}: max error {error:.3g} vs max |grad| {scale:.3g}"


def paired_call(module, hidden, weight, bias, inputs):
    """forward(lin_weight, _input, target, bias) of the paired classes."""
    return module(weight, hidden, inputs["labels"], bias)


def paired_call_with_reference(module, hidden, weight, bias, inputs):
    return module(weight, hidden, inputs["labels"], bias, inputs["ref_hidden"], inputs["ref_weight"],
                  inputs["ref_bias"])


DTYPES = [torch.float64, torch.float32]

DPO_SETTINGS = [
    dict(beta=0.1),
    dict(beta=0.5, use_ref_model=False, compute_nll_loss=True, average_log_prob=True, alpha=0.5),
    dict(beta=0.2, loss_type="hinge", compute_nll_loss=True, ignore_index=-1),
    dict(beta=0.1, loss_type="robust", label_smoothing=0.2, average_log_prob=True),
    dict(beta=0.1, loss_type="exo_pair", label_smoothing=1e-3),
    dict(beta=0.3, loss_type="nca_pair"),
    dict(beta=0.3, loss_type="bco_pair", use_ref_model=False),
    dict(beta=0.2, loss_type="sppo_hard", average_log_prob=True),
    dict(beta=0.1, loss_type="apo_zero"),
    dict(beta=0.1, loss_type="apo_down", compute_nll_loss=True),
    dict(beta=0.5, loss_type="discopop", discopop_tau=0.1),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", DPO_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_dpo_matches_liger(settings, dtype):
    call = paired_call_with_reference if settings.get("use_ref_model", True) else paired_call
    compare("LigerFusedLinearDPOLoss", settings, call, dtype, with_bias=settings.get("loss_type") != "hinge")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [
    dict(),
    dict(beta=0.5, alpha=0.3, label_smoothing=0.1, average_log_prob=True),
    dict(beta=1.0, compute_nll_loss=False, ignore_index=-1),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_cpo_matches_liger(settings, dtype):
    compare("LigerFusedLinearCPOLoss", settings, paired_call, dtype, upstream=2.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [
    dict(),
    dict(beta=2.0, gamma=1.0, label_smoothing=0.1, compute_nll_loss=False, alpha=0.7),
], ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_simpo_matches_liger(settings, dtype):
    compare("LigerFusedLinearSimPOLoss", settings, paired_call, dtype, with_bias=bool(settings))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [dict(), dict(beta=0.5, compute_nll_loss=False)],
                         ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_orpo_matches_liger(settings, dtype):
    compare("LigerFusedLinearORPOLoss", settings, paired_call, dtype)


def test_orpo_nll_target_matches_liger():
    """nll_target: the NLL term on other labels (here the prompt tokens too) than the odds ratio."""
    def call(module, hidden, weight, bias, inputs):
        nll_target = inputs["labels"].clone()
        nll_target[:, 1] = (torch.arange(2 * B) * 5) % V
        return module(weight, hidden, inputs["labels"], bias, nll_target=nll_target)
    compare("LigerFusedLinearORPOLoss", dict(beta=0.2), call, torch.float64)


PREFERENCE_LABELS = torch.tensor([True, False, True, True, False, False, True])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings, kl", [
    (dict(), None),
    (dict(beta=0.3, use_ref_model=True), 0.2),
    (dict(beta=0.5, use_ref_model=True, average_log_prob=True, ignore_index=-1), -0.1),
], ids=["defaults", "ref-kl", "ref-average-negative_kl"])
def test_kto_matches_liger(settings, kl, dtype):
    kl_tensor = None if kl is None else torch.tensor(kl, dtype=dtype)

    def call(module, hidden, weight, bias, inputs):  # KTO's order: (_input, lin_weight, target, bias, labels, ...)
        if settings.get("use_ref_model"):
            return module(hidden, weight, inputs["labels"], bias, PREFERENCE_LABELS, inputs["ref_hidden"],
                          inputs["ref_weight"], inputs["ref_bias"], kl_tensor)
        return module(hidden, weight, inputs["labels"], bias, preference_labels=PREFERENCE_LABELS, kl=kl_tensor)
    compare("LigerFusedLinearKTOLoss", settings, call, dtype, rows=len(PREFERENCE_LABELS))


def test_prefuse_head_options_and_default_reference_head():
    """Extra keywords reach prefuse's head (small chunks give the same result); without ref_weight the reference
    uses the policy's head."""
    inputs = make_inputs(torch.float64)
    hidden, weight, labels, ref_hidden = inputs["hidden"], inputs["weight"], inputs["labels"], inputs["ref_hidden"]
    want_loss, want_aux = compat.LigerFusedLinearDPOLoss(beta=0.3)(weight, hidden, labels, None, ref_hidden, weight)
    got_loss, got_aux = compat.LigerFusedLinearDPOLoss(beta=0.3, chunk_budget_bytes=V * 8 * 3, backend="torch")(
        weight, hidden, labels, ref_input=ref_hidden)
    assert_same(got_loss, want_loss, 1e-6, "loss")
    for got, want in zip(got_aux, want_aux):
        assert_same(got, want, 1e-6, "aux")


@pytest.mark.parametrize("name", CLASSES)
def test_signatures_match_liger(name):
    """Constructor arguments (names, order, defaults) and forward arguments (names, order) are Liger's; prefuse
    adds only **head_options to the constructor."""
    ours, theirs = getattr(compat, name), getattr(liger, name)
    ours_init = [p for p in inspect.signature(ours.__init__).parameters.values() if p.kind != p.VAR_KEYWORD]
    theirs_init = list(inspect.signature(theirs.__init__).parameters.values())
    assert [(p.name, p.default) for p in ours_init] == [(p.name, p.default) for p in theirs_init]
    assert list(inspect.signature(ours.forward).parameters) == list(inspect.signature(theirs.forward).parameters)


def ipo_reference(hidden, weight, bias, labels, ref_hidden, ref_weight, ref_bias, beta):
    """TRL's length-normalized IPO, written plainly in float64 with materialized logits. -> (loss, rewards [2B])"""
    def sums_and_counts(h, w, b):
        logp = torch.log_softmax((h @ w.T + b).double(), dim=-1)
        mask = labels != -100
        token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        return token.sum(-1), mask.sum(-1).double()
    policy, counts = sums_and_counts(hidden, weight, bias)
    with torch.no_grad():
        ref, _ = sums_and_counts(ref_hidden, ref_weight, ref_bias)
    per_token_logratios = (policy - ref) / counts
    margin = per_token_logratios[:B] - per_token_logratios[B:]
    return ((margin - 1 / (2 * beta)) ** 2).mean(), beta * (policy - ref).detach()


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_ipo_matches_float64_formula(average_log_prob):
    beta = 0.4
    inputs = make_inputs(torch.float64)
    labels, ref = inputs["labels"], (inputs["ref_hidden"], inputs["ref_weight"], inputs["ref_bias"])
    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    want_loss, want_rewards = ipo_reference(*leaves, labels, *ref, beta)
    want_grads = torch.autograd.grad(want_loss, leaves)

    leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
    module = compat.LigerFusedLinearDPOLoss(beta=beta, loss_type="ipo", average_log_prob=average_log_prob)
    got_loss, aux = module(leaves[1], leaves[0], labels, leaves[2], *ref)
    got_grads = torch.autograd.grad(got_loss, leaves)

    assert_same(got_loss, want_loss, TOLERANCE, "ipo loss")
    if average_log_prob:  # rewards then follow the per-token means, as Liger's do
        want_rewards = want_rewards / (labels != -100).sum(-1)
    assert_same(torch.cat([aux[5], aux[6]]), want_rewards.float(), TOLERANCE, "ipo rewards")
    for got, want in zip(got_grads, want_grads):
        assert (got - want).abs().max() <= GRAD_TOLERANCE * want.abs().max()


def test_liger_rejects_ipo_that_prefuse_adds():
    """The reason the ipo test has a formula, not Liger, as its reference."""
    with pytest.raises(ValueError):
        liger.LigerFusedLinearDPOLoss(loss_type="ipo")
    assert compat.LigerFusedLinearDPOLoss(loss_type="ipo").loss_type == "ipo"


def labeled_rows(labels, ignore_index=-100):
    return int((labels != ignore_index).sum())


@pytest.mark.parametrize("settings", [dict(beta=0.1), dict(beta=0.2, compute_nll_loss=True, alpha=0.5)],
                         ids=["sigmoid", "sigmoid+nll"])
def test_dpo_takes_the_in_forward_mode_with_liger_gradients(settings, chunk_rows):
    """The DPO class goes through PreferenceLoss's in-forward mode: the head's logits are formed once for the
    policy's rows and once for the reference's (no recompute in backward: 2 x the labeled rows, where the recompute
    mode takes 3 x), and the loss, outputs and gradients still equal Liger's. The NLL term keeps the mode."""
    inputs = make_inputs(torch.float64)
    rows = labeled_rows(inputs["labels"])

    def modes_and_rows(**head_options):
        module = compat.LigerFusedLinearDPOLoss(**settings, **head_options)
        chunk_rows.clear()
        result = run(module, paired_call_with_reference, inputs, with_bias=True)
        return module.preference_loss.last_mode, sum(chunk_rows), result

    mode, seen, (loss, aux, grads) = modes_and_rows()
    assert (mode, seen) == ("in_forward", 2 * rows)
    recompute_mode, recompute_seen, _ = modes_and_rows(mode="recompute")
    assert (recompute_mode, recompute_seen) == ("recompute", 3 * rows)

    want_loss, want_aux, want_grads = run(liger.LigerFusedLinearDPOLoss(**settings, compiled=False),
                                          paired_call_with_reference, inputs, with_bias=True)
    assert_same(loss, want_loss, TOLERANCE, "loss")
    for index, (got, want) in enumerate(zip(aux, want_aux)):
        assert_same(got, want, TOLERANCE, f"aux output {index}")
    for what, got, want in zip(("grad input", "grad weight", "grad bias"), grads, want_grads):
        assert (got - want).abs().max() <= GRAD_TOLERANCE * want.abs().max(), what


@pytest.mark.parametrize("name, settings, mode", [
    ("LigerFusedLinearDPOLoss", dict(loss_type="apo_zero", use_ref_model=False), "in_forward"),
    ("LigerFusedLinearDPOLoss", dict(average_log_prob=True), "in_forward"),  # as sigmoid_norm
    ("LigerFusedLinearDPOLoss", dict(loss_type="ipo", average_log_prob=True), "in_forward"),
    ("LigerFusedLinearDPOLoss", dict(loss_type="robust", average_log_prob=True), "fallback"),
    ("LigerFusedLinearSimPOLoss", dict(), "in_forward"),
    ("LigerFusedLinearCPOLoss", dict(), "recompute"),  # cpo is registered non-separable
    ("LigerFusedLinearORPOLoss", dict(), "recompute"),  # so is orpo
    ("LigerFusedLinearKTOLoss", dict(use_ref_model=True), "in_forward"),
    ("LigerFusedLinearKTOLoss", dict(average_log_prob=True), "fallback"),
], ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()))
def test_mode_each_class_takes(name, settings, mode):
    """The mode of each mapping (see the module docstring): in-forward wherever the objectives are separable, the
    per-token-mean fallback only for average_log_prob with a loss type no registered objective averages."""
    module = getattr(compat, name)(**settings)
    rows = len(PREFERENCE_LABELS) if name == "LigerFusedLinearKTOLoss" else 2 * B
    inputs = make_inputs(torch.float32, rows=rows)
    module.preference_loss.last_mode = None

    def call(module, hidden, weight, bias, inputs):
        if name == "LigerFusedLinearKTOLoss":
            return module(hidden, weight, inputs["labels"], bias, PREFERENCE_LABELS, inputs["ref_hidden"])
        if settings.get("use_ref_model", True) and name == "LigerFusedLinearDPOLoss":
            return module(weight, hidden, inputs["labels"], bias, inputs["ref_hidden"])
        return module(weight, hidden, inputs["labels"], bias)
    loss, _, grads = run(module, call, inputs, with_bias=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    taken = "fallback" if getattr(module, "fallback", False) else module.preference_loss.last_mode
    assert taken == mode
    if mode == "fallback":
        assert module.preference_loss.last_mode is None  # the fallback does not run PreferenceLoss
