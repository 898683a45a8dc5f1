"""Triton kernels for the memory-bound half of the fused head: streaming logsumexp over vocabulary blocks, label
gather, token statistics and the in-place gradient of a logits chunk.

The matmuls stay with torch (cuBLAS on GPU); these kernels read each chunk `logits [m, V]` once per pass, one
program per row, looping over the vocabulary in `BLOCK_V` tiles with an online (running max) logsumexp.
The launchers at the bottom have the same signatures as `torch_ops`.

Transform (as in torch_ops): z = softcap * tanh(x / softcap) when softcap is set, then z = z / temperature.
The inverse temperature is the scalar `inv_temp`, or with PER_ROW_TEMP one value per row read from INV_TEMP [m]
(the scalar path stays the default: no load).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tuned launch configs per kernel and GPU generation: (BLOCK_V, num_warps). Every entry is compiled for sm_80 and
# sm_90 by tests/test_kernel_compile.py, which fails on any register spill. Chosen from register counts and
# occupancy reasoning (one row per program; a tile of BLOCK_V fp32 values spread over num_warps*32 threads):
# Hopper's larger register file and bandwidth favour wider tiles; the stats kernel sorts its tile for top-k, so it
# keeps tiles small.
CONFIGS: dict[str, dict[int, tuple[int, int]]] = {
    "forward": {80: (4096, 8), 90: (8192, 16)},
    "grad": {80: (4096, 8), 90: (8192, 16)},
    "stats": {80: (1024, 4), 90: (2048, 8)},
}
# Under TRITON_INTERPRET=1 each loop iteration costs about a millisecond per program: wide tiles, fewer iterations.
INTERPRETER_BLOCK_V = 4096
# The stats kernel keeps a running top-K_PAD; two sizes cover top_k <= MAX_TOP_K with a finite set of variants.
K_PADS = (16, 64)
MAX_TOP_K = K_PADS[-1]


@triton.jit
def _tanh(x):
    # exp-based tanh: the same code on every backend and in the interpreter; exact at +-inf.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _load_z(row_ptr, cols, mask, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return tl.where(mask, x * inv_temp, float("-inf"))


@triton.jit
def _logits_forward_kernel(
    LOGITS, stride_row, LABELS, LOGP, LSE, MEAN_LOGP, LOG_SUM_SQ, INV_TEMP,
    V, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, WITH_MEAN: tl.constexpr, WITH_SUM_SQ: tl.constexpr, PER_ROW_TEMP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """logits [m, V] -> logp [m] = z[label] - lse, lse [m], mean_logp [m] = mean(z) - lse (WITH_MEAN), log sum_v
    p(v)^2 [m] (WITH_SUM_SQ: sum exp(2 (z - run_max)) streamed under the logsumexp's running max)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    label = tl.load(LABELS + row)
    if PER_ROW_TEMP:
        inv_temp = tl.load(INV_TEMP + row)
    run_max = float("-inf")
    run_sum = 0.0
    run_sum_sq = 0.0
    target = 0.0
    sum_z = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _load_z(row_ptr, cols, mask, inv_temp, softcap, HAS_SOFTCAP)
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)
        run_sum = run_sum * scale + tl.sum(e, axis=0)
        if WITH_SUM_SQ:
            run_sum_sq = run_sum_sq * (scale * scale) + tl.sum(e * e, axis=0)
        run_max = new_max
        target += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        if WITH_MEAN:
            sum_z += tl.sum(tl.where(mask, z, 0.0), axis=0)
    lse = run_max + tl.log(run_sum)
    tl.store(LSE + row, lse)
    tl.store(LOGP + row, target - lse)
    if WITH_MEAN:
        tl.store(MEAN_LOGP + row, sum_z / V - lse)
    if WITH_SUM_SQ:
        tl.store(LOG_SUM_SQ + row, tl.log(run_sum_sq) - 2.0 * tl.log(run_sum))


@triton.jit
def _logits_grad_kernel(
    LOGITS, stride_row, GRAD, stride_grad_row, LABELS, LSE, COEF_T, COEF_U, INV_TEMP,
    V, inv_vocab, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_UNIFORM: tl.constexpr, PER_ROW_TEMP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """grad [m, V] of sum_i A_i logp_i + B_i mean_logp_i w.r.t. the raw logits; GRAD may alias LOGITS (each
    element is read before the same program writes it). On a vocabulary tile V is the tile's width, labels are
    tile-local and inv_vocab is 1 / (the whole vocabulary)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    grad_ptr = GRAD + row * stride_grad_row
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    coef_t = tl.load(COEF_T + row)
    if PER_ROW_TEMP:
        inv_temp = tl.load(INV_TEMP + row)
    coef_u = 0.0
    if HAS_UNIFORM:
        coef_u = tl.load(COEF_U + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(x / softcap)
            x = softcap * t
        z = x * inv_temp
        grad = -(coef_t + coef_u) * tl.exp(z - lse) + tl.where(cols == label, coef_t, 0.0)
        if HAS_UNIFORM:
            grad += coef_u * inv_vocab
        if HAS_SOFTCAP:
            grad = grad * (1.0 - t * t)
        grad = grad * inv_temp
        tl.store(grad_ptr + cols, grad.to(GRAD.dtype.element_ty), mask=mask)


@triton.jit
def _logits_stats_kernel(
    LOGITS, stride_row, LABELS, LSE, ENTROPY, LOG_SUM_SQ, TOPK_MASS, TOPK_ENT, TOPK_ENT_UNNORM, LOGP, IS_ARGMAX,
    INV_TEMP, V, top_k, inv_temp, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_LABELS: tl.constexpr, PER_ROW_TEMP: tl.constexpr, K_PAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Streaming statistics of one row: logsumexp, entropy, log sum_v p(v)^2, top-k mass and entropies (running
    top-K_PAD values, merged tile by tile), and with labels the log-prob of the label and whether it is the (first)
    argmax."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = LOGITS + row * stride_row
    if PER_ROW_TEMP:
        inv_temp = tl.load(INV_TEMP + row)
    run_max = float("-inf")
    run_sum = 0.0
    run_sum_z = 0.0  # sum exp(z - run_max) * z, for the entropy
    run_sum_sq = 0.0  # sum exp(2 (z - run_max)): logsumexp(2 z) under its own running max 2 run_max
    argmax = 0
    top = tl.full([K_PAD], float("-inf"), tl.float32)
    label = 0
    target = 0.0
    if HAS_LABELS:
        label = tl.load(LABELS + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        z = _load_z(row_ptr, cols, mask, inv_temp, softcap, HAS_SOFTCAP)
        tile_max = tl.max(z, axis=0)
        tile_argmax = tl.min(tl.where(z == tile_max, cols, V), axis=0)
        argmax = tl.where(tile_max > run_max, tile_argmax, argmax)
        new_max = tl.maximum(run_max, tile_max)
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)
        run_sum = run_sum * scale + tl.sum(e, axis=0)
        run_sum_z = run_sum_z * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        run_sum_sq = run_sum_sq * (scale * scale) + tl.sum(e * e, axis=0)
        run_max = new_max
        top = tl.topk(tl.reshape(tl.join(top, tl.topk(z, K_PAD)), [2 * K_PAD]), K_PAD)
        if HAS_LABELS:
            target += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
    lse = run_max + tl.log(run_sum)
    tl.store(LSE + row, lse)
    tl.store(ENTROPY + row, lse - run_sum_z / run_sum)
    # logsumexp(2 z) - 2 logsumexp(z), the running maxima cancelling
    tl.store(LOG_SUM_SQ + row, tl.log(run_sum_sq) - 2.0 * tl.log(run_sum))
    keep = (tl.arange(0, K_PAD) < top_k) & (top > float("-inf"))
    top_logp = tl.where(keep, top - lse, 0.0)
    top_p = tl.where(keep, tl.exp(top_logp), 0.0)
    mass = tl.sum(top_p, axis=0)
    plogp = tl.sum(top_p * top_logp, axis=0)
    tl.store(TOPK_MASS + row, mass)
    tl.store(TOPK_ENT + row, tl.log(mass) - plogp / mass)
    tl.store(TOPK_ENT_UNNORM + row, -plogp)
    if HAS_LABELS:
        tl.store(LOGP + row, target - lse)
        tl.store(IS_ARGMAX + row, (argmax == label).to(tl.int8))


# ----------------------------------------------------------------------------------------------------------------
# Launchers: same signatures as torch_ops.

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pick_config(kernel: str, vocab: int, device: torch.device, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for `kernel` on `device`; `block_v` overrides the tile (tests use it).

    On a GPU the tuned tile is used as is (masking covers a vocabulary smaller than the tile), so the configs a
    launch can use are exactly the CONFIGS entries, which the compile test covers."""
    if block_v is not None:
        return block_v, 4
    if _interpreting() or device.type != "cuda":
        return min(INTERPRETER_BLOCK_V, triton.next_power_of_2(vocab)), 4
    major, minor = torch.cuda.get_device_capability(device)
    return config_for(kernel, major * 10 + minor)


def config_for(kernel: str, arch: int) -> tuple[int, int]:
    """The tuned (BLOCK_V, num_warps) of the newest generation in CONFIGS that is not newer than `arch`."""
    gens = sorted(CONFIGS[kernel])
    return CONFIGS[kernel][max([g for g in gens if g <= arch], default=gens[0])]


def _softcap_arg(softcap: float | None) -> float:
    return 1.0 if softcap is None else float(softcap)


def _temperature_args(inv_temperature, dummy: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(INV_TEMP pointer, scalar inv_temp, PER_ROW_TEMP) of a float or a float32 tensor [m] (one per row)."""
    if isinstance(inv_temperature, torch.Tensor):
        return inv_temperature.to(torch.float32).contiguous(), 1.0, True
    return dummy, float(inv_temperature), False


def logits_forward(logits, labels, *, inv_temperature=1.0, softcap=None, with_mean_logp=False, log_sum_sq_out=None,
                   block_v=None):
    m, vocab = logits.shape
    logp = torch.empty(m, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    mean_logp = torch.empty_like(logp) if with_mean_logp else None
    if m == 0:
        return logp, lse, mean_logp
    tile, warps = pick_config("forward", vocab, logits.device, block_v)
    per_row, inv_temp, per_row_temp = _temperature_args(inv_temperature, lse)
    sum_sq = None if log_sum_sq_out is None else torch.empty_like(logp)
    _logits_forward_kernel[(m,)](
        logits, logits.stride(0), labels, logp, lse, mean_logp if with_mean_logp else lse,
        lse if sum_sq is None else sum_sq, per_row,
        vocab, inv_temp, _softcap_arg(softcap),
        HAS_SOFTCAP=softcap is not None, WITH_MEAN=with_mean_logp, WITH_SUM_SQ=sum_sq is not None,
        PER_ROW_TEMP=per_row_temp, BLOCK_V=tile, num_warps=warps,
    )
    if sum_sq is not None:
        log_sum_sq_out.copy_(sum_sq)
    return logp, lse, mean_logp


def logits_grad_(logits, labels, lse, coef_target, coef_uniform=None, *, inv_temperature=1.0, softcap=None,
                 vocab_size=None, block_v=None):
    """Writes the gradient into `logits` (its dtype) and returns it."""
    m, vocab = logits.shape
    if m == 0:
        return logits
    tile, warps = pick_config("grad", vocab, logits.device, block_v)
    per_row, inv_temp, per_row_temp = _temperature_args(inv_temperature, lse)
    _logits_grad_kernel[(m,)](
        logits, logits.stride(0), logits, logits.stride(0), labels, lse, coef_target,
        coef_target if coef_uniform is None else coef_uniform, per_row,
        vocab, 1.0 / (vocab_size or vocab), inv_temp, _softcap_arg(softcap),
        HAS_SOFTCAP=softcap is not None, HAS_UNIFORM=coef_uniform is not None, PER_ROW_TEMP=per_row_temp,
        BLOCK_V=tile, num_warps=warps,
    )
    return logits


def logits_forward_grad_(logits, labels, coef_fn, *, inv_temperature=1.0, softcap=None, with_mean_logp=False,
                         log_sum_sq_out=None, block_v=None):
    logp, lse, mean_logp = logits_forward(
        logits, labels, inv_temperature=inv_temperature, softcap=softcap, with_mean_logp=with_mean_logp,
        log_sum_sq_out=log_sum_sq_out, block_v=block_v)
    coef_target, coef_uniform = coef_fn(logp, mean_logp)
    grad = logits_grad_(logits, labels, lse, coef_target, coef_uniform, inv_temperature=inv_temperature,
                        softcap=softcap, block_v=block_v)
    return logp, lse, mean_logp, grad


@torch.no_grad()
def logits_stats(logits, labels, *, inv_temperature=1.0, softcap=None, top_k=10, block_v=None):
    m, vocab = logits.shape
    dev = logits.device
    k = min(top_k, vocab)
    if k > MAX_TOP_K:
        raise ValueError(f"top_k: at most {MAX_TOP_K} on the triton backend, got {top_k}")
    k_pad = next(p for p in K_PADS if k <= p)
    tile, warps = pick_config("stats", vocab, dev, block_v)
    tile = max(tile, k_pad)
    out = {name: torch.empty(m, dtype=torch.float32, device=dev)
           for name in ("logsumexp", "entropy", "log_sum_sq_probs", "topk_mass", "topk_entropy",
                        "topk_entropy_unnormalized")}
    has_labels = labels is not None
    logp = torch.empty(m, dtype=torch.float32, device=dev) if has_labels else out["logsumexp"]
    is_argmax = torch.empty(m, dtype=torch.int8, device=dev) if has_labels else out["logsumexp"]
    if m > 0:
        per_row, inv_temp, per_row_temp = _temperature_args(inv_temperature, out["logsumexp"])
        _logits_stats_kernel[(m,)](
            logits, logits.stride(0), labels if has_labels else logits, out["logsumexp"], out["entropy"],
            out["log_sum_sq_probs"], out["topk_mass"], out["topk_entropy"], out["topk_entropy_unnormalized"], logp,
            is_argmax, per_row,
            vocab, k, inv_temp, _softcap_arg(softcap),
            HAS_SOFTCAP=softcap is not None, HAS_LABELS=has_labels, PER_ROW_TEMP=per_row_temp, K_PAD=k_pad,
            BLOCK_V=tile, num_warps=warps,
        )
    if has_labels:
        out["logprobs"] = logp
        out["label_is_argmax"] = is_argmax.bool()
    return out


# Kernel registry for the compile report: name -> (kernel, pointer/scalar signature builder, constexpr variants).
KERNELS = {
    "forward": _logits_forward_kernel,
    "grad": _logits_grad_kernel,
    "stats": _logits_stats_kernel,
}
