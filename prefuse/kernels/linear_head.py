"""Public entry points of the fused head: `linear_logprobs` and `linear_cross_entropy`.

Both take `hidden [..., H]` (the decoder's last hidden states), `weight [V, H]` (the lm_head weight, tied or not)
and `labels [...]`, drop the rows whose label is `ignore_index` before any matmul, and compute chunk by chunk:
memory for the head is O(rows_per_chunk x V + N x H), never O(N x V).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from prefuse.kernels.fused_head import FusedHeadInForward, FusedLogprobs, FusedLogprobsFrozenWeight, HeadConfig
from prefuse.kernels.low_rank import FusedLogprobsLowRank, LowRank, check_low_rank
from prefuse.kernels.plan import MODES, make_plan
from prefuse.kernels.rows import select_labeled_rows, zero_connected
from prefuse.kernels.stats import TokenStats, assemble_stats
from prefuse.kernels.validate import check_head_inputs, check_transform, resolve_backend

REDUCTIONS = ("mean", "sum", "none")
LOGPROBS_MODES = ("auto", "recompute", "frozen_weight")


def _needs_grad(*tensors) -> tuple[bool, bool, bool]:
    on = torch.is_grad_enabled()
    return tuple(bool(on and t is not None and t.requires_grad) for t in tensors)


def weight_frozen(needs: tuple[bool, bool, bool]) -> bool:
    """needs (hidden, weight, bias) from _needs_grad: only hidden wants a gradient (the frozen-weight mode)."""
    return needs[0] and not needs[1] and not needs[2]


def logprobs_function(plan_mode: str, needs: tuple[bool, bool, bool]):
    """The autograd Function of a plan: the frozen-weight one only while only hidden needs a gradient (a
    reference pass over the same rows under no_grad runs the plain forward over the same chunks)."""
    return FusedLogprobsFrozenWeight if plan_mode == "frozen_weight" and weight_frozen(needs) else FusedLogprobs


def _config(plan, backend, rows, softcap, with_mean_logp, accumulate_fp32, block_v) -> HeadConfig:
    return HeadConfig(rows_per_chunk=plan.rows_per_chunk, backend=backend, vocab_tile=plan.vocab_tile,
                      inv_temperature=rows.inv_temperature,
                      softcap=softcap, with_mean_logp=with_mean_logp, accumulate_fp32=accumulate_fp32,
                      block_v=block_v)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_budget_bytes: int | None = None,
    accumulate_fp32: bool = True,
    check_finite: bool = False,
    block_v: int | None = None,
    return_stats: bool = False,
    top_k: int = 10,
    mode: str = "auto",
    low_rank: LowRank | None = None,
) -> torch.Tensor | tuple[torch.Tensor, TokenStats]:
    """Per-token log-probability of `labels` under softmax(transform(hidden @ weight.T + bias)).

    hidden [..., H] (fp32, bf16, fp16 or fp64), weight [V, H] and bias [V] of the same dtype, labels [...] integer.
    The transform is `softcap * tanh(x / softcap)` when `softcap` is given (Gemma-2's final-logit cap), then
    division by `temperature`: a float, or a tensor of values > 0 whose shape is a leading part of labels' ([S]
    per sequence or [S, T] per token for labels [S, T]; no gradient flows to it). Returns float32 [...] with 0 at
    positions whose label is `ignore_index`.
    Differentiable with respect to hidden, weight and bias; backward recomputes each chunk's logits (the upstream
    gradient of a log-prob is known only after the objective has seen whole sequences).

    backend: "torch" (chunked torch, any device), "triton" (CUDA, or the CPU under TRITON_INTERPRET=1), "auto"
    (triton on CUDA tensors). chunk_size (rows per chunk) or chunk_budget_bytes bound the logits held at once
    (default, kernels/plan.py: 2 MiB on the CPU and 8 MiB elsewhere, in vocabulary tiles when whole
    rows do not fit; a frozen weight 32 MiB; 96 MiB of whole-vocabulary rows with return_stats).
    accumulate_fp32: sum the weight gradient over chunks in float32 for bf16/fp16 inputs. check_finite: raise a
    ValueError when hidden holds NaN or Inf. block_v: Triton vocabulary tile override.
    return_stats: also return the TokenStats of every labeled position (entropy, top-k mass with `top_k`, ...),
    read from the same logits chunks in forward (no gradient; the chunks then span the whole vocabulary).
    mode: "frozen_weight" when only hidden needs a gradient (weight and bias frozen: LoRA): forward also forms each
    row's gradient basis [N, H] and backward scales it (two matmuls per chunk instead of three); "recompute"
    always recomputes; "auto" (default) takes frozen_weight exactly when grad mode is on, hidden requires grad and
    weight and bias do not.
    low_rank: (u [..., r], factor [V, r]) adds u @ factor.T to the logits (LoRA on the lm_head: u = scale *
    dropout(hidden) @ A.T, factor = B; kernels/low_rank.py), chunk by chunk, with gradients to u and factor; the
    recompute path (mode "frozen_weight" is refused).
    """
    check_head_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, check_finite=check_finite)
    check_transform(temperature, softcap, labels.shape)
    if mode not in LOGPROBS_MODES:
        raise ValueError(f"mode: {mode!r} is not one of {LOGPROBS_MODES} (per-token log-probs have no in-forward "
                         f"mode: their upstream gradient is unknown in forward)")
    backend = resolve_backend(backend, hidden.device)
    rows = select_labeled_rows(hidden, labels, ignore_index, temperature)
    needs = _needs_grad(hidden, weight, bias)
    if return_stats and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k: must be a positive integer, got {top_k!r}")
    low = () if low_rank is None else low_rank
    if low_rank is not None:
        check_low_rank(hidden, weight, low_rank)
        if mode == "frozen_weight":
            raise ValueError("mode: 'frozen_weight' takes no low_rank (its factor needs each chunk's gradient in "
                             "backward); use mode='auto' or 'recompute'")
    if rows.n_rows == 0:
        logp = torch.zeros(rows.shape, dtype=torch.float32, device=hidden.device) + zero_connected(
            hidden, weight, bias, *low)
        return (logp, assemble_stats([], rows, with_labels=True)) if return_stats else logp
    plan = make_plan(n_rows=rows.n_rows, hidden_size=hidden.shape[-1], vocab=weight.shape[0], dtype=hidden.dtype,
                     device=hidden.device, needs_grad=any(needs + _needs_grad(*low)), upstream_known=False,
                     mode=mode, chunk_size=chunk_size, chunk_budget_bytes=chunk_budget_bytes,
                     whole_vocab_rows=return_stats, weight_frozen=weight_frozen(needs) and low_rank is None)
    cfg = _config(plan, backend, rows, softcap, False, accumulate_fp32, block_v)
    function = logprobs_function(plan.mode, needs) if low_rank is None else FusedLogprobsLowRank
    operands = (rows.hidden, weight, bias) + (() if low_rank is None else (low[0].reshape(-1, low[0].shape[-1]),
                                                                           low[1]))
    if not return_stats:
        return rows.scatter(function.apply(*operands, rows.labels, rows.index, cfg))
    chunks: list = []
    cfg = replace(cfg, stats_top_k=top_k)
    logp = function.apply(*operands, rows.labels, rows.index, cfg, None, chunks)
    return rows.scatter(logp), assemble_stats(chunks, rows, with_labels=True)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    mode: str = "auto",
    chunk_size: int | None = None,
    chunk_budget_bytes: int | None = None,
    grad_budget_bytes: int | None = None,
    accumulate_fp32: bool = True,
    check_finite: bool = False,
    block_v: int | None = None,
) -> torch.Tensor:
    """Drop-in for `F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=, reduction=, label_smoothing=)`
    without the [N, V] logits. hidden [..., H], weight [V, H], bias [V], labels [...].

    reduction: "mean" over non-ignored tokens, "sum", or "none" (float32 [...], 0 at ignored positions). One
    deliberate difference: when every label is ignored, "mean" returns 0 (with zero gradients), not NaN.

    mode: "in_forward" forms the gradients during forward (one matmul fewer; holds grad_hidden [N, H] and a float32
    grad_weight [V, H] until backward), "recompute" recomputes logits in backward, "auto" takes in_forward when
    those buffers fit `grad_budget_bytes` (default: a quarter of free CUDA memory, 4 GiB on the CPU). reduction
    "none" recomputes (the per-token upstream gradient is unknown in forward), except with a frozen weight and no
    label smoothing, where "auto" takes "frozen_weight" (see `linear_logprobs`; with a scalar reduction the
    in-forward mode costs the same two matmuls per chunk and stays the choice). Other arguments as in
    `linear_logprobs`.
    """
    check_head_inputs(hidden, weight, labels, bias, ignore_index=ignore_index, check_finite=check_finite)
    check_transform(temperature, softcap, labels.shape)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: {reduction!r} is not one of {REDUCTIONS}")
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: must be in [0, 1], got {label_smoothing}")
    backend = resolve_backend(backend, hidden.device)
    rows = select_labeled_rows(hidden, labels, ignore_index, temperature)
    needs = _needs_grad(rows.hidden, weight, bias)
    smoothing = float(label_smoothing)
    if mode == "frozen_weight" and smoothing > 0:
        raise ValueError("mode: 'frozen_weight' does not take label_smoothing (it holds one basis per row); use "
                         "mode='auto'")
    # the frozen-weight plan only where it saves a matmul: per-token losses (scalar ones go in-forward)
    frozen = weight_frozen(needs) and smoothing == 0 and (reduction == "none" or mode == "frozen_weight")
    if rows.n_rows == 0:
        zero = zero_connected(hidden, weight, bias)
        return torch.zeros(rows.shape, device=hidden.device) + zero if reduction == "none" else zero
    plan = make_plan(n_rows=rows.n_rows, hidden_size=hidden.shape[-1], vocab=weight.shape[0], dtype=hidden.dtype,
                     device=hidden.device, needs_grad=any(needs), upstream_known=reduction != "none", mode=mode,
                     chunk_size=chunk_size, chunk_budget_bytes=chunk_budget_bytes,
                     grad_budget_bytes=grad_budget_bytes, weight_frozen=frozen)
    cfg = _config(plan, backend, rows, softcap, smoothing > 0, accumulate_fp32, block_v)
    scale = 1.0 / rows.n_rows if reduction == "mean" else 1.0

    if plan.mode == "in_forward":
        def coefs(chunk_rows, logp, mean_logp):
            coef_t = torch.full_like(logp, -(1.0 - smoothing) * scale)
            return coef_t, (torch.full_like(logp, -smoothing * scale) if smoothing > 0 else None)

        loss, _, _ = FusedHeadInForward.apply(rows.hidden, weight, bias, rows.labels, rows.index, cfg, coefs,
                                              needs)
        return loss

    out = logprobs_function(plan.mode, needs).apply(rows.hidden, weight, bias, rows.labels, rows.index, cfg)
    token_loss = -(1.0 - smoothing) * out[0] - smoothing * out[1] if smoothing > 0 else -out
    if reduction == "none":
        return rows.scatter(token_loss)
    return token_loss.sum() * scale
