"""The fused head over groups of sequences: rows grouped so that a caller can form gradients in forward.

    rows = group_rows(labels [S, T], sequence_group [S], vocab=V, hidden_size=H, dtype=..., needs_grad=True)
    logp = grouped_logprobs(hidden [S, T, H], weight [V, H], rows)                  # [M], recompute backward
    surrogate, logp = grouped_logprobs(hidden, weight, rows, coef_fn=coef_fn)       # in-forward gradient

A group is a set of sequences whose loss depends only on their own log-probs (one example of a preference loss:
its chosen, rejected, sampled, ... responses). `group_rows` keeps the labeled rows of the sequences that belong
to a group (`sequence_group[s] >= 0`), orders them group by group, and, when grouping is asked for and fits, cuts
them into chunks of whole groups within the chunk budget: then `coef_fn(chunk, logp_chunk) -> coef [m]` (the
loss's gradient with respect to each row's log-prob, computed from the chunk's own groups) is called as soon as a
chunk's log-probs are known and the head's gradients are formed in the same pass (one matmul fewer). Otherwise
the plan is the recompute path. With `weight_frozen` (only hidden needs a gradient: LoRA) the plan is the
frozen-weight path for any loss: forward forms each row's gradient basis, backward scales it (no coef_fn needed).
Passing the same `rows` for a second head (a reference) runs the same rows, chunks and reductions: equal inputs
give bitwise equal log-probs.

Packed sequences (`hidden_index`): the labels stay in the sequences' own layout [S, T] (what the caller's
per-sequence sums, token values and groups are keyed by), while the hidden states come packed, several sequences
to a row without padding ([R, L, H]); hidden_index [S, T] says where each position's hidden state lies among the
R * L packed ones. Each row then reads its hidden state there; everything keyed by sequence is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from prefuse.kernels.fused_head import (
    FusedHeadInForward,
    FusedLogprobsFrozenWeight,
    HeadConfig,
    chunk_logits,
    chunk_slices,
)
from prefuse.kernels.linear_head import logprobs_function
from prefuse.kernels.low_rank import (
    FusedHeadInForwardLowRank,
    FusedLogprobsLowRank,
    LowRank,
    add_low_rank_,
    check_low_rank,
)
from prefuse.kernels.plan import DEFAULT_CHUNK_BUDGET_BYTES, MODES, Plan, make_plan, rows_for_budget
from prefuse.kernels.rows import gather_rows, inv_temperature_per_position, zero_connected
from prefuse.kernels.validate import check_transform, resolve_backend

GroupCoefFn = Callable[[slice, torch.Tensor], torch.Tensor]

__all__ = ["RowGroups", "group_rows", "grouped_logprobs", "grouped_logprobs_shared", "grouped_log_sum_sq_probs",
           "GroupCoefFn"]


@dataclass(frozen=True)
class RowGroups:
    """The labeled rows a grouped call reads, in group order (M of them).

    index [M]: each row's position in the flattened [S * T]; labels [M]; sequence [M]: its sequence in [0, S);
    group [M]: its group; chunks: slices of whole groups (in-forward plan) or None (the plan's own chunks);
    shape: (S, T); hidden_index [M]: each row's position among hidden's flattened rows (index itself unless the
    hidden states are packed); hidden_rows: how many rows hidden holds (S * T unless packed)."""

    index: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor
    group: torch.Tensor
    chunks: list[slice] | None
    plan: Plan
    shape: tuple[int, int]
    hidden_index: torch.Tensor
    hidden_rows: int

    @property
    def n_rows(self) -> int:
        return int(self.index.shape[0])

    @property
    def in_forward(self) -> bool:
        return self.plan.mode == "in_forward"

    @property
    def frozen_weight(self) -> bool:
        return self.plan.mode == "frozen_weight"


def _whole_group_chunks(group: torch.Tensor, rows_per_chunk: int) -> list[slice] | None:
    """Slices of consecutive whole groups of sorted `group` [M], each within rows_per_chunk; None when one group
    alone is larger."""
    _, counts = torch.unique_consecutive(group, return_counts=True)
    chunks, start, size = [], 0, 0
    for count in counts.tolist():
        if count > rows_per_chunk:
            return None
        if size + count > rows_per_chunk:
            chunks.append(slice(start, start + size))
            start, size = start + size, 0
        size += count
    if size:
        chunks.append(slice(start, start + size))
    return chunks


def group_rows(labels: torch.Tensor, sequence_group: torch.Tensor, *, vocab: int, hidden_size: int,
               dtype: torch.dtype, needs_grad: bool, grouped: bool = True, ignore_index: int = -100,
               mode: str = "auto", chunk_size: int | None = None, chunk_budget_bytes: int | None = None,
               grad_budget_bytes: int | None = None, weight_frozen: bool = False,
               hidden_index: torch.Tensor | None = None) -> RowGroups:
    """labels [S, T]; sequence_group [S] int64: each sequence's group, -1 for a sequence nobody reads (its rows are
    dropped before any matmul). grouped: take the in-forward plan when `mode` and the budgets allow it (the
    caller's loss is separable by group); mode "in_forward" insists on it (ValueError when a group is larger than
    a chunk). weight_frozen: only hidden will need a gradient; mode "auto" then takes "frozen_weight" (as many
    matmuls as in_forward, for any loss), "frozen_weight" insists on it (ValueError when the weight is not frozen).
    hidden_index [S, T] int64: packed hidden states (module docstring), the position of each (s, t) among hidden's
    flattened rows, -1 where there is none (padding; such a position must carry no label). Other arguments as in
    `linear_cross_entropy`."""
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    if labels.dim() != 2 or sequence_group.shape != labels.shape[:1]:
        raise ValueError(f"sequence_group: expected [S] for labels [S, T], got {tuple(sequence_group.shape)} and "
                         f"{tuple(labels.shape)}")
    n_seq, seq_len = labels.shape
    groups = sequence_group.to(labels.device).long()
    flat_labels = labels.reshape(-1).long()
    keep = (flat_labels != ignore_index) & (groups[:, None] >= 0).expand(n_seq, seq_len).reshape(-1)
    index = keep.nonzero().squeeze(1)
    row_group = groups.repeat_interleave(seq_len)[index]
    order = torch.sort(row_group, stable=True).indices  # group by group; within a group in sequence order
    index, row_group = index[order], row_group[order]
    n_rows = int(index.shape[0])
    device = labels.device
    want = grouped and needs_grad and mode not in ("recompute", "frozen_weight") and n_rows > 0
    frozen = weight_frozen and mode in ("auto", "frozen_weight")  # for any loss, grouped or not
    plan = make_plan(n_rows=n_rows, hidden_size=hidden_size, vocab=vocab, dtype=dtype, device=device,
                     needs_grad=needs_grad, upstream_known=want,
                     mode=mode if want or frozen or mode == "frozen_weight" else "recompute", chunk_size=chunk_size,
                     chunk_budget_bytes=chunk_budget_bytes, grad_budget_bytes=grad_budget_bytes,
                     weight_frozen=weight_frozen)
    chunks = _whole_group_chunks(row_group, plan.rows_per_chunk) if plan.mode == "in_forward" else None
    if plan.mode == "in_forward" and chunks is None:
        if mode == "in_forward":
            raise ValueError(f"mode: 'in_forward' needs every group within one chunk of {plan.rows_per_chunk} "
                             f"rows; raise chunk_size / chunk_budget_bytes or use mode='auto'")
        plan = make_plan(n_rows=n_rows, hidden_size=hidden_size, vocab=vocab, dtype=dtype, device=device,
                         needs_grad=needs_grad, upstream_known=False, mode="recompute", chunk_size=chunk_size,
                         chunk_budget_bytes=chunk_budget_bytes)
    hidden_at, hidden_rows = index, n_seq * seq_len
    if hidden_index is not None:
        hidden_at, hidden_rows = _packed_rows(hidden_index, labels, index, ignore_index)
    return RowGroups(index=index, labels=flat_labels[index], sequence=torch.div(index, seq_len, rounding_mode="floor"),
                     group=row_group, chunks=chunks, plan=plan, shape=(n_seq, seq_len), hidden_index=hidden_at,
                     hidden_rows=hidden_rows)


def _packed_rows(hidden_index: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 ignore_index: int) -> tuple[torch.Tensor, int]:
    """(each kept row's position among the packed hidden rows [M], how many packed rows there are: 1 + the largest
    position, a lower bound the caller's hidden must hold); ValueError when a labeled position has no hidden state
    or two positions share one."""
    if hidden_index.shape != labels.shape:
        raise ValueError(f"hidden_index: expected [S, T] = {tuple(labels.shape)} like labels, got "
                         f"{tuple(hidden_index.shape)}")
    flat = hidden_index.to(labels.device).reshape(-1).long()
    if bool(((flat < 0) & (labels.reshape(-1) != ignore_index)).any()):
        raise ValueError("hidden_index: a labeled position has no packed hidden state (-1); pack every token of "
                         "every sequence")
    placed = flat[flat >= 0]
    if placed.unique().numel() != placed.numel():
        raise ValueError("hidden_index: two positions share one packed hidden state; each must have its own")
    return flat[index], int(placed.max()) + 1 if placed.numel() else 0


def _head_config(rows: RowGroups, device, backend, temperature, softcap, accumulate_fp32) -> HeadConfig:
    return HeadConfig(rows_per_chunk=rows.plan.rows_per_chunk, backend=resolve_backend(backend, device),
                      vocab_tile=rows.plan.vocab_tile, inv_temperature=_row_inv_temperature(temperature, rows, device),
                      softcap=softcap, accumulate_fp32=accumulate_fp32)


def _row_inv_temperature(temperature, rows: RowGroups, device) -> float | torch.Tensor:
    """1 / temperature of each of the rows (float32 [M], in their order), or the float."""
    inv_t = inv_temperature_per_position(temperature, rows.shape, device)
    return inv_t[rows.index] if isinstance(inv_t, torch.Tensor) else inv_t


def _check_hidden_rows(flat: torch.Tensor, hidden: torch.Tensor, rows: RowGroups) -> None:
    """ValueError unless hidden holds the rows' positions: S * T of them, or, packed, at least hidden_rows."""
    packed = rows.hidden_index is not rows.index
    if (flat.shape[0] < rows.hidden_rows) if packed else (flat.shape[0] != rows.hidden_rows):
        raise ValueError(f"hidden: {tuple(hidden.shape)} does not hold the {rows.shape[0]} x {rows.shape[1]} "
                         f"positions of the rows' labels" + (" (packed: hidden_index)" if packed else ""))


def grouped_logprobs(hidden: torch.Tensor, weight: torch.Tensor, rows: RowGroups, *,
                     bias: torch.Tensor | None = None, coef_fn: GroupCoefFn | None = None,
                     temperature: float | torch.Tensor = 1.0, softcap: float | None = None, backend: str = "auto",
                     accumulate_fp32: bool = True, low_rank: LowRank | None = None,
                     log_sum_sq_out: torch.Tensor | None = None):
    """Per-row log-probs [M] float32 of `rows` (in their order) under softmax(transform(hidden @ weight.T + bias)).

    hidden [S, T, H] (or [S * T, H]), weight [V, H], bias [V]. Without coef_fn: logp [M], differentiable with a
    recomputing backward, or with the frozen-weight backward when rows.frozen_weight and only hidden needs a
    gradient. With coef_fn (rows.in_forward must hold): (surrogate 0-d, logp [M] without gradient),
    where the surrogate's value is sum_i coef_i * logp_i and its gradient, formed in forward, is the caller's loss
    gradient; add `surrogate - surrogate.detach()` to the loss value to route it.
    temperature: a float, or one value per sequence [S] or per token [S, T] of the rows' labels (no gradient).
    log_sum_sq_out [M] float32: receives each row's log sum_v p(v)^2 (WPO's per-token term, no gradient) from
    the same pass: the same logits chunks, summed under the logsumexp's running max (no matmul of its own); with
    coef_fn a chunk's rows are written before coef_fn reads that chunk.
    low_rank: (u [..., r] like hidden's leading shape, factor [V, r]) adds u @ factor.T to the logits (LoRA on the
    lm_head, `linear_logprobs`), with gradients to u and factor: without coef_fn logp [M] with a recomputing
    backward over the rows' chunks, whatever their plan (the frozen-weight plan's basis cannot carry the factor's
    gradient: build such rows with weight_frozen=False); with coef_fn the in-forward gradient as above. No
    log_sum_sq_out (grouped_log_sum_sq_probs computes it in a pass of its own)."""
    check_transform(temperature, softcap, rows.shape)
    flat = hidden.reshape(-1, hidden.shape[-1])
    _check_hidden_rows(flat, hidden, rows)
    _check_log_sum_sq_out(log_sum_sq_out, rows)
    cfg = _head_config(rows, hidden.device, backend, temperature, softcap, accumulate_fp32)
    if low_rank is not None:
        return _low_rank_logprobs(flat, weight, bias, low_rank, rows, cfg, coef_fn, log_sum_sq_out)
    on = torch.is_grad_enabled()
    needs = tuple(bool(on and t is not None and t.requires_grad) for t in (flat, weight, bias))
    if coef_fn is None:
        if rows.n_rows == 0:
            return torch.zeros(0, dtype=torch.float32, device=hidden.device) + zero_connected(flat, weight, bias)
        function = logprobs_function(rows.plan.mode, needs)
        if function is FusedLogprobsFrozenWeight:
            return function.apply(flat, weight, bias, rows.labels, rows.hidden_index, cfg, rows.chunks, None, None,
                                  log_sum_sq_out)
        return function.apply(flat, weight, bias, rows.labels, rows.hidden_index, cfg, rows.chunks, None,
                              log_sum_sq_out)
    if not rows.in_forward:
        raise ValueError("coef_fn: the rows' plan is not in_forward (build them with group_rows(grouped=True))")
    surrogate, logp, _ = FusedHeadInForward.apply(flat, weight, bias, rows.labels, rows.hidden_index, cfg,
                                                  lambda chunk, lp, _mean: (coef_fn(chunk, lp), None), needs,
                                                  rows.chunks, log_sum_sq_out)
    return surrogate, logp


def _check_log_sum_sq_out(out: torch.Tensor | None, rows: RowGroups) -> None:
    if out is not None and (out.shape != (rows.n_rows,) or out.dtype != torch.float32 or out.requires_grad):
        raise ValueError(f"log_sum_sq_out: expected a float32 [M] = ({rows.n_rows},) tensor without gradient, got "
                         f"{out.dtype} {tuple(out.shape)}")


def _low_rank_logprobs(flat, weight, bias, low_rank: LowRank, rows: RowGroups, cfg: HeadConfig, coef_fn,
                       log_sum_sq_out: torch.Tensor | None = None):
    """grouped_logprobs with a low-rank update (u [..., r] flattened like hidden): logp [M] (recompute), or with
    coef_fn (surrogate, logp [M]), the gradients formed in forward; log_sum_sq_out from the same chunks."""
    u, factor = low_rank[0].reshape(-1, low_rank[0].shape[-1]), low_rank[1]
    check_low_rank(flat, weight, (u, factor))
    if coef_fn is not None:
        if not rows.in_forward:
            raise ValueError("coef_fn: the rows' plan is not in_forward (build them with group_rows(grouped=True))")
        on = torch.is_grad_enabled()
        needs = tuple(bool(on and t is not None and t.requires_grad) for t in (flat, weight, bias, u, factor))
        return FusedHeadInForwardLowRank.apply(flat, weight, bias, u, factor, rows.labels, rows.hidden_index, cfg,
                                               coef_fn, needs, rows.chunks, log_sum_sq_out)
    if rows.n_rows == 0:
        return torch.zeros(0, dtype=torch.float32, device=flat.device) + zero_connected(flat, weight, bias, u, factor)
    return FusedLogprobsLowRank.apply(flat, weight, bias, u, factor, rows.labels, rows.hidden_index, cfg, rows.chunks,
                                      None, log_sum_sq_out)


def grouped_logprobs_shared(hidden: torch.Tensor, ref_hidden: torch.Tensor, weight: torch.Tensor, rows: RowGroups,
                            *, bias: torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0,
                            softcap: float | None = None, backend: str = "auto", accumulate_fp32: bool = True,
                            log_sum_sq_out: torch.Tensor | None = None):
    """(logp [M], ref_logp [M]) of `rows` for a policy and a reference that share the lm_head (LoRA: the reference
    is the base model, adapters disabled). hidden and ref_hidden [S, T, H] (or [S * T, H]); weight [V, H] and
    bias [V] need no gradient. On the frozen-weight plan with only hidden needing a gradient, the reference's rows
    go through the policy's chunks (one logits matmul per chunk for both, the reference's rows without a basis);
    otherwise the reference runs as its own pass over the same rows without gradient. ref_logp has no gradient.
    temperature and log_sum_sq_out (the policy's rows) as in grouped_logprobs."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    ref_flat = ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()
    if ref_flat.shape != flat.shape:
        raise ValueError(f"ref_hidden: {tuple(ref_hidden.shape)} does not match hidden's {tuple(hidden.shape)}")
    head = dict(bias=bias, temperature=temperature, softcap=softcap, backend=backend, accumulate_fp32=accumulate_fp32)
    on = torch.is_grad_enabled()
    needs = tuple(bool(on and t is not None and t.requires_grad) for t in (flat, weight, bias))
    if not (rows.frozen_weight and needs == (True, False, False) and rows.n_rows > 0):
        with torch.no_grad():
            ref_logp = grouped_logprobs(ref_flat, weight.detach(), rows,
                                        **{**head, "bias": None if bias is None else bias.detach()})
        return grouped_logprobs(hidden, weight, rows, log_sum_sq_out=log_sum_sq_out, **head), ref_logp
    check_transform(temperature, softcap, rows.shape)
    _check_hidden_rows(flat, hidden, rows)
    _check_log_sum_sq_out(log_sum_sq_out, rows)
    cfg = _head_config(rows, hidden.device, backend, temperature, softcap, accumulate_fp32)
    return FusedLogprobsFrozenWeight.apply(flat, weight, bias, rows.labels, rows.hidden_index, cfg, rows.chunks, None,
                                           ref_flat, log_sum_sq_out)


@torch.no_grad()
def grouped_log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, rows: RowGroups, *,
                             bias: torch.Tensor | None = None, temperature: float | torch.Tensor = 1.0,
                             softcap: float | None = None,
                             backend: str = "auto", chunk_budget_bytes: int | None = None,
                             low_rank: LowRank | None = None) -> torch.Tensor:
    """log sum_v p(v)^2 [M] float32 of `rows` (in their order), without gradient: WPO's per-token term, from the
    statistics kernel (`logits_stats`, logsumexp(2 z) - 2 logsumexp(z) under a running max). A forward-only pass
    of its own over whole-vocabulary chunks (one logits matmul per chunk), beside the log-prob pass: for callers
    without a log-prob pass (or with low_rank); grouped_logprobs(log_sum_sq_out=...) takes it from its own chunks.
    low_rank: the logits' low-rank update, as in grouped_logprobs."""
    check_transform(temperature, softcap, rows.shape)
    inv_t = _row_inv_temperature(temperature, rows, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1]).detach()
    backend = resolve_backend(backend, hidden.device)
    if backend == "triton":
        from prefuse.kernels import triton_ops as ops
    else:
        from prefuse.kernels import torch_ops as ops
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    per_chunk = rows_for_budget(weight.shape[0], flat.element_size(), chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES)
    out = torch.zeros(rows.n_rows, dtype=torch.float32, device=hidden.device)
    u = None if low_rank is None else low_rank[0].detach().reshape(-1, low_rank[0].shape[-1])
    for sl in chunk_slices(rows.n_rows, per_chunk):
        logits = chunk_logits(gather_rows(flat, rows.hidden_index, sl), weight, bias)
        if u is not None:
            add_low_rank_(logits, gather_rows(u, rows.hidden_index, sl), low_rank[1].detach())
        chunk_inv_t = inv_t[sl] if isinstance(inv_t, torch.Tensor) else inv_t
        out[sl] = ops.logits_stats(logits, None, inv_temperature=chunk_inv_t, softcap=softcap,
                                   top_k=1)["log_sum_sq_probs"]
    return out
