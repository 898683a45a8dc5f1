"""Benchmark paths: each builds a forward+backward step at a shape.

Three tasks. "head": a linear cross-entropy head, `make(hidden [N, H], weight [V, H], labels [N]) -> step`, shape
(N, H, V). "logprobs": per-token log-probs of the same inputs, backward of their sum (the shape of every
preference objective's head), shape (N, H, V). "preference": a DPO loss (sigmoid, beta 0.1) with a reference model's hidden states,
`make(hidden [2B, T, H], weight [V, H], labels [2B, T], ref_hidden [2B, T, H]) -> step`, shape (B, T, H, V).
`step()` runs forward and backward and returns the loss. Peers are included only when their package imports; the
per-token peers (PyTorch's chunked op, cut-cross-entropy's `torch_compile` path and its and Liger's Triton kernels)
are their cross-entropy with
reduction "none", negated, so that every logprobs path returns the sum of the log-probs. Inputs are drawn on the
device.
`--frozen_weight` (make_task_inputs) gives every path a weight that needs no gradient (LoRA); the
`prefuse_logprobs_frozen` paths freeze their own weight, so that one run times the frozen-weight head beside the
trainable one and beside the recompute path with the same frozen weight. The `_lora` paths put a LoRA adapter
(r=16, scale 2, B nonzero) on that frozen lm_head: prefuse's low-rank update inside the fused head
(kernels/low_rank.py) and the materialized logits h W^T + 2 (h A^T) B^T (peft's forward), gradients to hidden, A, B.
"""
from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import prefuse


@dataclass(frozen=True)
class Path:
    name: str
    make: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: str | None = None  # module that must import
    warmup: int = 1  # compiled peers need their first call to compile
    task: str = "head"
    compiled: bool = False  # built by torch.compile: on the CPU it needs inductor's C++ toolchain

    def available(self, device: str) -> bool:
        if device not in self.devices:
            return False
        if self.requires is not None and importlib.util.find_spec(self.requires) is None:
            return False
        return not (self.compiled and device == "cpu") or inductor_compiles_for_cpu()


_PROBE = """
import torch
f = torch.compile(lambda x: (x.exp() * 2).sum())
assert float(f(torch.zeros(8))) == 16.0
"""


@functools.lru_cache(maxsize=None)
def inductor_compiles_for_cpu() -> bool:
    """Whether torch.compile builds a CPU kernel here, probed once in a fresh process. It fails where no C++
    compiler is installed, or where ATen's vector headers are cut to the scalar set (ATEN_CPU_CAPABILITY=default);
    a compiled peer is then left out of the bench like one whose package is missing."""
    try:
        return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, timeout=300).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def _step(loss_fn, hidden, weight):
    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def prefuse_path(backend: str, mode: str):
    def make(hidden, weight, labels):
        return _step(lambda: prefuse.linear_cross_entropy(hidden, weight, labels, backend=backend, mode=mode),
                     hidden, weight)
    return make


def materialized(hidden, weight, labels):
    return _step(lambda: F.cross_entropy((hidden @ weight.t()).float(), labels), hidden, weight)


def torch_linear_cross_entropy(hidden, weight, labels):
    options = torch.nn.LinearCrossEntropyOptions()
    return _step(lambda: F.linear_cross_entropy(hidden, weight, labels, options=options), hidden, weight)


def cut_cross_entropy(impl: str):
    def make(hidden, weight, labels):
        from cut_cross_entropy import linear_cross_entropy

        return _step(lambda: linear_cross_entropy(hidden, weight, labels, impl=impl), hidden, weight)
    return make


PATHS: dict[str, Path] = {p.name: p for p in [
    Path("prefuse_torch", prefuse_path("torch", "auto")),
    Path("prefuse_torch_recompute", prefuse_path("torch", "recompute")),
    Path("prefuse_triton", prefuse_path("triton", "auto"), devices=("cuda",), requires="triton"),
    Path("materialized", materialized),
    Path("torch_linear_cross_entropy", torch_linear_cross_entropy),
    Path("cce_torch_compile", cut_cross_entropy("torch_compile"), requires="cut_cross_entropy", warmup=2,
         compiled=True),
    Path("cce_triton", cut_cross_entropy("cce"), devices=("cuda",), requires="cut_cross_entropy"),
    Path("liger_fused_linear_cross_entropy", None, devices=("cuda",), requires="liger_kernel"),
]}


def _liger(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _step(lambda: loss(weight, hidden, labels), hidden, weight)


PATHS["liger_fused_linear_cross_entropy"] = Path("liger_fused_linear_cross_entropy", _liger, devices=("cuda",),
                                                 requires="liger_kernel")


def prefuse_preference(hidden, weight, labels, ref_hidden):
    from prefuse.preference import PreferenceLoss

    loss_fn = PreferenceLoss("sigmoid", beta=0.1)
    return _step(lambda: loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)[0], hidden, weight)


def prefuse_preference_separate_reference(hidden, weight, labels, ref_hidden):
    """The reference as its own pass over the rows (with a frozen weight, prefuse_preference rides it in the
    policy's chunks: one weight read fewer per chunk)."""
    from prefuse.preference import PreferenceLoss

    loss_fn = PreferenceLoss("sigmoid", beta=0.1, share_reference_chunks=False)
    return _step(lambda: loss_fn(hidden, weight, labels, ref_hidden=ref_hidden)[0], hidden, weight)


def materialized_preference(hidden, weight, labels, ref_hidden):
    """Full logits of policy and reference, log_softmax, gather, sum, DPO."""
    def seq_logps(h):
        logp = torch.log_softmax((h @ weight.t()).float(), dim=-1)
        keep = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (tok * keep).sum(-1)

    def loss():
        batch = labels.shape[0] // 2
        seq = seq_logps(hidden)
        with torch.no_grad():
            ref = seq_logps(ref_hidden)
        return -F.logsigmoid(0.1 * ((seq[:batch] - ref[:batch]) - (seq[batch:] - ref[batch:]))).mean()
    return _step(loss, hidden, weight)


def liger_dpo(hidden, weight, labels, ref_hidden):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=True)

    def loss():
        out = loss_fn(weight, hidden, labels, ref_input=ref_hidden, ref_weight=weight.detach())
        return out[0] if isinstance(out, tuple) else out
    return _step(loss, hidden, weight)


def prefuse_logprobs(hidden, weight, labels):
    return _step(lambda: prefuse.linear_logprobs(hidden, weight, labels, backend="torch").sum(), hidden, weight)


def prefuse_logprobs_recompute(hidden, weight, labels):
    """Always the recompute path (with a frozen weight: three matmuls per chunk where the default takes two)."""
    return _step(lambda: prefuse.linear_logprobs(hidden, weight, labels, backend="torch", mode="recompute").sum(),
                 hidden, weight)


def prefuse_logprobs_frozen(mode: str):
    """The lm_head frozen (a LoRA policy): "auto" takes the frozen-weight path, "recompute" the three-matmul one."""
    def make(hidden, weight, labels):
        frozen = weight.detach()
        return _step(lambda: prefuse.linear_logprobs(hidden, frozen, labels, backend="torch", mode=mode).sum(),
                     hidden, frozen)
    return make


LORA_RANK = 16


def _lora_factors(weight):
    """A [16, H] and B [V, 16] (nonzero) of a LoRA adapter on the lm_head, drawn on its device, needing gradients."""
    generator = torch.Generator().manual_seed(1)
    vocab, hidden_size = weight.shape
    a = torch.randn(LORA_RANK, hidden_size, generator=generator) / hidden_size ** 0.5
    b = torch.randn(vocab, LORA_RANK, generator=generator) * 0.01
    return tuple(t.to(weight.device, weight.dtype).requires_grad_() for t in (a, b))


def _lora_step(logp_sum, hidden, weight):
    """The step of a LoRA path: logp_sum(u = 2 h A^T, B) with the lm_head frozen; gradients to hidden, A and B."""
    frozen = weight.detach()
    a, b = _lora_factors(frozen)

    def loss():
        a.grad = b.grad = None
        return logp_sum(frozen, 2.0 * hidden @ a.t(), b)
    return _step(loss, hidden, frozen)


def prefuse_logprobs_lora(hidden, weight, labels):
    return _lora_step(lambda w, u, b: prefuse.linear_logprobs(hidden, w, labels, backend="torch",
                                                              low_rank=(u, b)).sum(), hidden, weight)


def materialized_logprobs_lora(hidden, weight, labels):
    def logp_sum(w, u, b):
        logp = torch.log_softmax((hidden @ w.t() + u @ b.t()).float(), dim=-1)
        return (logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * (labels != -100)).sum()
    return _lora_step(logp_sum, hidden, weight)


def materialized_logprobs(hidden, weight, labels):
    def loss():
        logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
        keep = labels != -100
        return (logp.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1) * keep).sum()
    return _step(loss, hidden, weight)


def trl_chunked_logprob(hidden, weight, labels):
    """TRL 1.16's fused log-prob head, called as its trainers call it: valid rows only, 32768-wide vocab tiles."""
    from trl.kernels import ChunkedLogProbFunction

    keep = labels != -100

    def loss():
        out = ChunkedLogProbFunction.apply(hidden[keep], weight, None, labels[keep], 1.0, 32768, None, 1.0, ())
        return out[0].sum()
    return _step(loss, hidden, weight)


def prefuse_logprobs_triton(hidden, weight, labels):
    return _step(lambda: prefuse.linear_logprobs(hidden, weight, labels, backend="triton").sum(), hidden, weight)


def _minus_token_losses(token_loss):
    """A peer's per-token cross-entropy (reduction "none", 0 on ignored labels) as the sum of log-probs."""
    return lambda: -token_loss().float().sum()


def torch_linear_logprobs(hidden, weight, labels):
    """PyTorch's chunked `F.linear_cross_entropy`, per token."""
    options = torch.nn.LinearCrossEntropyOptions()
    return _step(_minus_token_losses(lambda: F.linear_cross_entropy(hidden, weight, labels, reduction="none",
                                                                    ignore_index=-100, options=options)),
                 hidden, weight)


def cce_logprobs(hidden, weight, labels):
    """cut-cross-entropy's Triton kernel, per token."""
    from cut_cross_entropy import linear_cross_entropy

    return _step(_minus_token_losses(lambda: linear_cross_entropy(hidden, weight, labels, impl="cce",
                                                                  reduction="none")), hidden, weight)


def cce_compile_logprobs(hidden, weight, labels):
    """cut-cross-entropy's `torch_compile` path (its CPU implementation), per token."""
    from cut_cross_entropy import linear_cross_entropy

    return _step(_minus_token_losses(lambda: linear_cross_entropy(hidden, weight, labels, impl="torch_compile",
                                                                  reduction="none")), hidden, weight)


def liger_logprobs(hidden, weight, labels):
    """Liger-Kernel's fused linear cross-entropy (Triton), per token."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    return _step(_minus_token_losses(lambda: loss(weight, hidden, labels)), hidden, weight)


PATHS.update({p.name: p for p in [
    Path("prefuse_logprobs", prefuse_logprobs, task="logprobs"),
    Path("prefuse_logprobs_triton", prefuse_logprobs_triton, devices=("cuda",), requires="triton", task="logprobs"),
    Path("torch_linear_logprobs", torch_linear_logprobs, task="logprobs"),
    Path("cce_torch_compile_logprobs", cce_compile_logprobs, requires="cut_cross_entropy", warmup=2,
         task="logprobs", compiled=True),
    Path("cce_triton_logprobs", cce_logprobs, devices=("cuda",), requires="cut_cross_entropy", task="logprobs"),
    Path("liger_logprobs", liger_logprobs, devices=("cuda",), requires="liger_kernel", task="logprobs"),
    Path("prefuse_logprobs_recompute", prefuse_logprobs_recompute, task="logprobs"),
    Path("prefuse_logprobs_frozen", prefuse_logprobs_frozen("auto"), task="logprobs"),
    Path("prefuse_logprobs_frozen_recompute", prefuse_logprobs_frozen("recompute"), task="logprobs"),
    Path("materialized_logprobs", materialized_logprobs, task="logprobs"),
    Path("prefuse_logprobs_lora", prefuse_logprobs_lora, task="logprobs"),
    Path("materialized_logprobs_lora", materialized_logprobs_lora, task="logprobs"),
    Path("trl_chunked_logprob", trl_chunked_logprob, requires="trl", task="logprobs"),
    Path("prefuse_preference", prefuse_preference, task="preference"),
    Path("prefuse_preference_separate_reference", prefuse_preference_separate_reference, task="preference"),
    Path("materialized_preference", materialized_preference, task="preference"),
    Path("liger_dpo", liger_dpo, requires="liger_kernel", task="preference", warmup=2, compiled=True),
]})


def make_task_inputs(task: str, shape, dtype: torch.dtype, device: str, ignore_frac: float, seed: int = 0,
                     frozen_weight: bool = False):
    """The inputs of a path of `task` at `shape` (see the module docstring); frozen_weight: the weight needs no
    gradient."""
    inputs = _task_inputs(task, shape, dtype, device, ignore_frac, seed)
    if frozen_weight:
        inputs[1].requires_grad_(False)
    return inputs


def _task_inputs(task, shape, dtype, device, ignore_frac, seed):
    if task in ("head", "logprobs"):
        return make_inputs(*shape, dtype, device, ignore_frac, seed)
    batch, length, h, v = shape
    gen = torch.Generator(device).manual_seed(seed)
    on = dict(generator=gen, device=device)
    hidden = torch.randn(2 * batch, length, h, **on).to(dtype=dtype).requires_grad_()
    ref_hidden = torch.randn(2 * batch, length, h, **on).to(dtype=dtype)
    weight = (torch.randn(v, h, **on) / h ** 0.5).to(dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (2 * batch, length), **on)
    labels[:, : int(length * ignore_frac)] = -100  # the prompt
    return hidden, weight, labels, ref_hidden


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, ignore_frac: float, seed: int = 0):
    """hidden [N, H] and weight [V, H] requiring grad, labels [N] with `ignore_frac` of them -100. Drawn on the
    device (a [128256, 4096] weight drawn on the host takes seconds per fresh process)."""
    gen = torch.Generator(device).manual_seed(seed)
    on = dict(generator=gen, device=device)
    hidden = torch.randn(n, h, **on).to(dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, **on) / h ** 0.5).to(dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), **on)
    labels[torch.rand(n, **on) < ignore_frac] = -100
    return hidden, weight, labels
