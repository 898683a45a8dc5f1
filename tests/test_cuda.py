"""The CUDA subset (`pytest -m cuda`; bench/gpu_check.sh runs it): on one GPU, at real shapes (Llama-3's V=128256 at
H=4096, and Llama-2's V=32000 at an odd token count), the Triton backend against the torch backend and the float64
truth, values and gradients, in float32 and bf16: per-token log-probs, cross-entropy in both modes, the
frozen-weight path, and DPO through PreferenceLoss.

Skipped without CUDA, and under TRITON_INTERPRET=1 (tests/conftest.py sets it for the CPU's interpreter tests; the
compiled kernels need `TRITON_INTERPRET=0 pytest -m cuda`).

Tolerances. float32 (TF32 off): |err| <= 1e-4 * (1 + max|ref|) against float64, both backends. bf16: the error
against float64 at most 1.5x the plain torch path's own error in bf16 (logits in bf16, log_softmax in float32,
autograd) plus 1e-2 of the reference's scale, as in test_head_parity; the two backends then agree within the sum
of their errors.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import prefuse
from prefuse.preference import PreferenceLoss
from tests.reference import cross_entropy64, logprobs64

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1 (the CPU interpreter); run TRITON_INTERPRET=0 pytest -m cuda"),
]
BF16_MARGIN = 1e-2
FP32_REL = 1e-4
SHAPES = [(4096, 4096, 128256), (1000, 2048, 32000)]  # (N, H, V)


@pytest.fixture(autouse=True)
def exact_float32_matmuls():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.cuda.empty_cache()


def cuda_inputs(n, h, v, dtype, ignore_frac=0.25, seed=0, weight_grad=True):
    gen = torch.Generator("cuda").manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device="cuda") / h ** 0.5).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=gen, device="cuda")
    labels[torch.rand(n, generator=gen, device="cuda") < ignore_frac] = -100
    return hidden, weight, labels


def grads(output, inputs, seed=1):
    """Gradients of sum(output * r), r fixed and random, with respect to each input that requires grad."""
    gen = torch.Generator("cuda").manual_seed(seed)
    r = torch.randn(output.shape, generator=gen, device="cuda", dtype=torch.float64).to(output.dtype)
    inputs = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad((output * r).sum(), inputs)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def scale(ref):
    return 1.0 + ref.double().abs().max().item()


def check_with_gradients(out: dict, truth, plain, inputs: list, dtype):
    """check() on the values, then on the gradient of each of a scalar's inputs."""
    check(out, truth, plain, dtype)
    truth_grads, plain_grads = torch.autograd.grad(truth, inputs), torch.autograd.grad(plain, inputs)
    got = {b: torch.autograd.grad(o, inputs) for b, o in out.items()}
    for k in range(len(inputs)):
        check({b: g[k] for b, g in got.items()}, truth_grads[k], plain_grads[k], dtype)


def check(got: dict, truth, plain, dtype):
    """got: {backend: tensor}; truth: float64; plain: the plain torch path in dtype (bf16 only)."""
    for backend, value in got.items():
        if dtype == torch.float32:
            assert err(value, truth) <= FP32_REL * scale(truth), (backend, err(value, truth))
        else:
            bound = 1.5 * err(plain, truth) + BF16_MARGIN * scale(truth)
            assert err(value, truth) <= bound, (backend, err(value, truth), bound)


def plain_logprobs(hidden, weight, labels):
    logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
    keep = labels != -100
    return torch.where(keep, logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,v", SHAPES, ids=lambda x: str(x))
def test_logprobs_triton_equals_torch_and_float64(n, h, v, dtype):
    hidden, weight, labels = cuda_inputs(n, h, v, dtype)
    truth = logprobs64(hidden, weight, labels)
    plain = plain_logprobs(hidden, weight, labels)
    out = {b: prefuse.linear_logprobs(hidden, weight, labels, backend=b) for b in ("triton", "torch")}
    assert all(o.dtype == torch.float32 and o.shape == labels.shape for o in out.values())
    check(out, truth, plain, dtype)
    truth_grads, plain_grads = grads(truth, [hidden, weight]), grads(plain, [hidden, weight])
    got = {b: grads(o, [hidden, weight]) for b, o in out.items()}
    for k in range(2):  # grad_hidden, grad_weight
        assert all(g[k].dtype == dtype for g in got.values())
        check({b: g[k] for b, g in got.items()}, truth_grads[k], plain_grads[k], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_cross_entropy_both_modes(mode, dtype):
    hidden, weight, labels = cuda_inputs(4096, 4096, 128256, dtype)
    truth = cross_entropy64(hidden, weight, labels)
    plain = F.cross_entropy((hidden @ weight.t()).float(), labels)
    out = {b: prefuse.linear_cross_entropy(hidden, weight, labels, backend=b, mode=mode) for b in ("triton", "torch")}
    check_with_gradients(out, truth, plain, [hidden, weight], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_weight_path_equals_recompute_and_float64(dtype):
    """A frozen lm_head (LoRA): grad_hidden from the basis formed in forward, on both backends."""
    hidden, weight, labels = cuda_inputs(4096, 4096, 128256, dtype, weight_grad=False)
    truth = logprobs64(hidden, weight, labels)
    plain = plain_logprobs(hidden, weight, labels)
    out = {f"{b}_{m}": prefuse.linear_logprobs(hidden, weight, labels, backend=b, mode=m)
           for b in ("triton", "torch") for m in ("frozen_weight", "recompute")}
    check(out, truth, plain, dtype)
    (truth_grad,), (plain_grad,) = grads(truth, [hidden]), grads(plain, [hidden])
    check({k: grads(o, [hidden])[0] for k, o in out.items()}, truth_grad, plain_grad, dtype)


def dpo64(hidden, ref_hidden, weight, labels, beta=0.1):
    """Sigmoid DPO in float64 from full logits: rows [0, B) chosen, [B, 2B) rejected."""
    seq = logprobs64(hidden, weight, labels).sum(-1)
    ref = logprobs64(ref_hidden, weight.detach(), labels).sum(-1)
    b = labels.shape[0] // 2
    return -F.logsigmoid(beta * ((seq[:b] - ref[:b]) - (seq[b:] - ref[b:]))).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dpo_preference_loss_triton_equals_torch_and_float64(dtype):
    pairs, length, h, v = 2, 1024, 4096, 128256
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(2 * pairs, length, h, generator=gen, device="cuda").to(dtype).requires_grad_()
    ref_hidden = torch.randn(2 * pairs, length, h, generator=gen, device="cuda").to(dtype)
    weight = (torch.randn(v, h, generator=gen, device="cuda") / h ** 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (2 * pairs, length), generator=gen, device="cuda")
    labels[:, : length // 4] = -100  # the prompt
    truth = dpo64(hidden, ref_hidden, weight, labels)
    plain_seq = plain_logprobs(hidden.flatten(0, 1), weight, labels.flatten()).view(2 * pairs, length).sum(-1)
    with torch.no_grad():
        plain_ref = plain_logprobs(ref_hidden.flatten(0, 1), weight, labels.flatten()).view(2 * pairs, length).sum(-1)
    delta = (plain_seq[:pairs] - plain_ref[:pairs]) - (plain_seq[pairs:] - plain_ref[pairs:])
    plain = -F.logsigmoid(0.1 * delta).mean()
    out = {b: PreferenceLoss("sigmoid", beta=0.1, backend=b)(hidden, weight, labels, ref_hidden=ref_hidden)[0]
           for b in ("triton", "torch")}
    check_with_gradients(out, truth, plain, [hidden, weight], dtype)
