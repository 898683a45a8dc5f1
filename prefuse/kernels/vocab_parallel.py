"""The fused head with the lm_head split by vocabulary across the ranks of a process group.

    logp = vocab_parallel_logprobs(hidden, weight_shard, labels, vocab_start=rank * V_r, group=group)
    loss = vocab_parallel_cross_entropy(hidden, weight_shard, labels, vocab_start=..., group=group)

Each rank holds `weight_shard [V_r, H]`, rows vocab_start .. vocab_start + V_r - 1 of the whole [V, H] weight (the
shards tile [0, V) in rank order; V_r may differ by rank, for an odd V). `hidden [..., H]` and `labels [...]` (ids
in the WHOLE vocabulary) are the same on every rank, as are the computations downstream of the returned log-probs
(the sharded-head layout of tensor parallelism, where the activations at the head are replicated). Per chunk of
rows each rank computes its shard's logits [m, V_r], their maximum, sum of exponentials and the label's logit when
the label falls in its shard; the group combines them once for all rows (all-reduce: max, then the rescaled sums
and the target logits), so lse = gmax + log(sum_r s_r exp(max_r - gmax)). Backward recomputes each chunk's shard
logits: the shard's part of d logp / d hidden = (onehot - softmax) @ W_r is summed over the group (all-reduce), the
weight shard's gradient stays local. No rank holds the whole weight or a [rows, V] block of logits; the memory of
the head per rank is one [m, V_r] chunk plus [N, H] for the hidden states' gradient.

The transform matches `linear_logprobs`: logits -> softcap * tanh(logits / softcap) (when set) -> / temperature.
Rows whose label is ignore_index get log-prob 0 and no gradient, and never reach a matmul.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from prefuse.kernels.rows import gather_rows, select_labeled_rows
from prefuse.kernels.validate import check_transform

DEFAULT_ROWS_PER_CHUNK = 1024


def _chunks(n_rows: int, rows_per_chunk: int) -> list[slice]:
    return [slice(s, min(s + rows_per_chunk, n_rows)) for s in range(0, n_rows, rows_per_chunk)]


def _chunk_inv_temperature(inv_temperature: float | torch.Tensor, rows: slice) -> float | torch.Tensor:
    """The chunk's 1 / temperature: the float, or its rows' values as a [m, 1] column."""
    return inv_temperature[rows, None] if isinstance(inv_temperature, torch.Tensor) else inv_temperature


def _transformed(logits: torch.Tensor, inv_temperature: float | torch.Tensor, softcap: float | None):
    """(z, dz/dlogits) of the float32 chunk logits [m, V_r] (inv_temperature: a float or [m, 1]); the derivative
    is None when it is inv_temperature itself."""
    if softcap is None:
        return logits * inv_temperature, None
    tanh = torch.tanh(logits / softcap)
    return softcap * tanh * inv_temperature, (1 - tanh * tanh) * inv_temperature


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, rows_per_chunk, inv_temperature, softcap, group):
        """hidden [M, H] (labeled rows), weight [V_r, H], labels [M] (whole-vocabulary ids) -> logp [M] float32."""
        n_rows, shard = hidden.shape[0], weight.shape[0]
        local = labels - vocab_start
        owned = (local >= 0) & (local < shard)
        local = torch.where(owned, local, torch.zeros_like(local))
        row_max = torch.full((n_rows,), -torch.inf, device=hidden.device)
        row_sum = torch.zeros(n_rows, device=hidden.device)
        target = torch.zeros(n_rows, device=hidden.device)
        for rows in _chunks(n_rows, rows_per_chunk):
            z, _ = _transformed((hidden[rows] @ weight.T).float(), _chunk_inv_temperature(inv_temperature, rows),
                                softcap)
            row_max[rows] = z.max(-1).values
            row_sum[rows] = torch.exp(z - row_max[rows, None]).sum(-1)
            picked = z.gather(-1, local[rows, None]).squeeze(-1)
            target[rows] = torch.where(owned[rows], picked, torch.zeros_like(picked))
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        row_sum *= torch.exp(row_max - global_max)
        dist.all_reduce(row_sum, group=group)
        dist.all_reduce(target, group=group)  # exactly one rank owns each label
        lse = global_max + torch.log(row_sum)
        ctx.save_for_backward(hidden, weight, local, owned, lse)
        ctx.settings = (rows_per_chunk, inv_temperature, softcap, group)
        return target - lse

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, local, owned, lse = ctx.saved_tensors
        rows_per_chunk, inv_temperature, softcap, group = ctx.settings
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_logp = grad_logp.float()
        for rows in _chunks(hidden.shape[0], rows_per_chunk):
            inv_t = _chunk_inv_temperature(inv_temperature, rows)
            z, dz = _transformed((hidden[rows] @ weight.T).float(), inv_t, softcap)
            coef = -torch.exp(z - lse[rows, None])  # d logp / d z = onehot - softmax
            coef.scatter_add_(-1, local[rows, None], owned[rows, None].float())
            coef *= grad_logp[rows, None]
            if dz is not None:
                coef *= dz
            else:
                coef *= inv_t
            if need_hidden:
                grad_hidden[rows] = coef @ weight.float()
            if need_weight:
                grad_weight += coef.T @ hidden[rows].float()
        if need_hidden:
            dist.all_reduce(grad_hidden, group=group)  # every shard's part of the gradient of the same rows
            grad_hidden = grad_hidden.to(hidden.dtype)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def vocab_parallel_logprobs(hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, *,
                            vocab_start: int, group=None, ignore_index: int = -100,
                            temperature: float | torch.Tensor = 1.0,
                            softcap: float | None = None,
                            rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK) -> torch.Tensor:
    """Per-token log-probs [...] (float32; 0 where labels == ignore_index) of labels [...] under
    softmax(transform(hidden [..., H] @ W.T)), W split by vocabulary across `group` (module docstring).
    temperature: a float, or one value per row as in `linear_logprobs` ([S] or [S, T] for labels [S, T]), the same
    on every rank."""
    if weight_shard.dim() != 2 or hidden.shape[-1] != weight_shard.shape[1]:
        raise ValueError(f"weight_shard: expected [V_r, H] with H = {hidden.shape[-1]}, got "
                         f"{tuple(weight_shard.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk: must be at least 1, got {rows_per_chunk}")
    check_transform(temperature, softcap, labels.shape)
    vocab = torch.tensor([weight_shard.shape[0]], device=weight_shard.device)
    dist.all_reduce(vocab, group=group)
    valid = labels[labels != ignore_index]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= int(vocab)):
        raise ValueError(f"labels: ids must be in [0, {int(vocab)}) (the shards' whole vocabulary) or "
                         f"ignore_index={ignore_index}")
    rows = select_labeled_rows(hidden, labels, ignore_index, temperature)
    picked = gather_rows(rows.hidden, rows.index, slice(0, rows.n_rows))
    logp = _VocabParallelLogprobs.apply(picked, weight_shard, rows.labels, vocab_start, rows_per_chunk,
                                        rows.inv_temperature, softcap, group)
    return rows.scatter(logp)


def vocab_parallel_cross_entropy(hidden: torch.Tensor, weight_shard: torch.Tensor, labels: torch.Tensor, *,
                                 vocab_start: int, group=None, ignore_index: int = -100, reduction: str = "mean",
                                 **options) -> torch.Tensor:
    """Cross-entropy of labels under the vocabulary-parallel head: the mean (or sum, or per-token values) of
    -log p over the positions whose label is not ignore_index; "mean" of no labeled position is 0."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: {reduction!r} is not one of ('mean', 'sum', 'none')")
    nll = -vocab_parallel_logprobs(hidden, weight_shard, labels, vocab_start=vocab_start, group=group,
                                   ignore_index=ignore_index, **options)
    if reduction == "none":
        return nll
    total = nll.sum()
    return total if reduction == "sum" else total / (labels != ignore_index).sum().clamp(min=1)


def vocab_shard(vocab: int, rank: int, world_size: int) -> tuple[int, int]:
    """(start, size) of rank's contiguous shard of a vocabulary of `vocab` ids: the first vocab % world_size
    ranks hold one id more."""
    base, extra = divmod(vocab, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (1 if rank < extra else 0)
