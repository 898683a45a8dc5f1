"""The fused head with a low-rank update of the lm_head (LoRA on it): logits = h W^T (+ b) + u F^T, chunk by chunk.

    u = scale * dropout(hidden) @ A.T                                   # [..., r], by the caller (autograd: A, h)
    logp = linear_logprobs(hidden, weight, labels, low_rank=(u, B))     # B: the factor F [V, r]

Neither W + scale * B A [V, H] nor a copy of W is formed, and no [N, V] logits: each chunk's logits are the head's
matmul h_c W^T (the same `chunk_logits` as the plain head, so with F = 0 the chunk is the plain head's bit for bit)
and then one thin matmul u_c F^T added into the same buffer (addmm_ with K = r). A matmul of [h_c | u_c] against
[W | F] would need the concatenated weight, a copy of W per chunk (`bench/low_rank_order.py` times the orders).

Backward recomputes each chunk's logits the same way and takes G = d loss / d logits [m, V] from the chunk op
(`logits_grad_`, either backend), then grad_h_c = G W, grad_u_c = G F, grad_F += G^T u_c, and grad_W += G^T h_c,
grad_b += sum G only when they require grad (LoRA freezes W: that matmul and its [V, H] buffer are skipped).
The gradients of A and of hidden's share through u follow from autograd through u. Two Functions, as for the plain
head: `FusedLogprobsLowRank` recomputes (three weight-sized matmuls per chunk with a frozen W), and
`FusedHeadInForwardLowRank` forms G in forward where the upstream coefficients are known chunk by chunk (a
separable objective over whole groups: two weight-sized matmuls, the economy of the plain head's frozen-weight
path, which cannot take the update: F's gradient needs each chunk's G, not a per-row basis).
"""
from __future__ import annotations

import torch

from prefuse.kernels.fused_head import (
    HeadConfig,
    _compute_dtype_grad,
    _GradAccumulator,
    _rows_of,
    chunk_logits,
    chunk_slices,
    logits_buffer,
    vocab_slices,
)
from prefuse.kernels.rows import gather_rows

LowRank = tuple[torch.Tensor, torch.Tensor]  # (u [..., r] like hidden's leading shape, factor [V, r])


def check_low_rank(hidden: torch.Tensor, weight: torch.Tensor, low_rank) -> None:
    """ValueError unless low_rank is (u [..., r] with hidden's leading shape, factor [V, r]), both in the weight's
    dtype and on its device."""
    if not (isinstance(low_rank, tuple) and len(low_rank) == 2
            and all(isinstance(t, torch.Tensor) for t in low_rank)):
        raise ValueError("low_rank: expected a pair of tensors (u [..., r], factor [V, r])")
    u, factor = low_rank
    if u.shape[:-1] != hidden.shape[:-1] or u.dim() != hidden.dim():
        raise ValueError(f"low_rank: u {tuple(u.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])} "
                         f"and a rank dimension")
    if factor.dim() != 2 or factor.shape != (weight.shape[0], u.shape[-1]):
        raise ValueError(f"low_rank: factor {tuple(factor.shape)} must be [V, r] = [{weight.shape[0]}, "
                         f"{u.shape[-1]}]")
    for name, t in (("u", u), ("factor", factor)):
        if t.dtype != weight.dtype or t.device != weight.device:
            raise ValueError(f"low_rank: {name} is {t.dtype} on {t.device}, the weight {weight.dtype} on "
                             f"{weight.device}; cast it (u = u.to(weight.dtype))")


def add_low_rank_(logits: torch.Tensor, u_chunk: torch.Tensor, factor_tile: torch.Tensor) -> torch.Tensor:
    """logits [m, Vt] += u_chunk [m, r] @ factor_tile.T in place, in the buffer's own layout (row-major, or the
    transposed view of a [Vt, m] buffer: the torch backend's)."""
    if logits.t().is_contiguous() and not logits.is_contiguous():
        logits.t().addmm_(factor_tile, u_chunk.t())
    else:
        logits.addmm_(u_chunk, factor_tile.t())
    return logits


def _logits(h, u, weight, bias, factor, vocab: slice, buffer, cfg: HeadConfig) -> torch.Tensor:
    w_tile, b_tile = weight[vocab], None if bias is None else bias[vocab]
    logits = chunk_logits(h, w_tile, b_tile, out=buffer, columns=cfg.columns)
    return add_low_rank_(logits, u, factor[vocab])


class FusedLogprobsLowRank(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, u [N, r], factor [V, r], labels [M], index [M] | None (the
    kept rows of hidden and u) -> logp [M] float32 of the labels under softmax(transform(h W^T + b + u F^T)).

    The vocabulary tiles of cfg.vocab_tile merge like the plain head's (logaddexp of the tiles' logsumexps), so with
    F = 0 (LoRA's initial B) the log-probs equal the plain head's over the same chunks bit for bit."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, u, factor, labels, index, cfg: HeadConfig, chunks=None, stats_sink=None,
                log_sum_sq_out=None):
        """chunks, stats_sink, log_sum_sq_out [M] as in FusedLogprobs.forward (statistics need whole-vocabulary
        rows; log sum_v p(v)^2 comes from the same chunks, the tiles merged as the plain head merges them)."""
        if cfg.with_mean_logp:
            raise ValueError("low_rank: no mean_logp (label smoothing) with a low-rank update; use label_smoothing=0")
        n_rows, vocab = labels.shape[0], weight.shape[0]
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        tiles = vocab_slices(vocab, cfg.vocab_tile)
        chunks = chunk_slices(n_rows, cfg.rows_per_chunk) if chunks is None else chunks
        longest = max((c.stop - c.start for c in chunks), default=1)
        buffer = logits_buffer(labels, weight, longest, tiles[0].stop - tiles[0].start)
        for rows in chunks:
            h, uc, lab = gather_rows(hidden, index, rows), gather_rows(u, index, rows), labels[rows]
            kw = cfg.op_kwargs(rows)
            if len(tiles) == 1:
                logits = _logits(h, uc, weight, bias, factor, tiles[0], buffer, cfg)
                if cfg.stats_top_k is not None:
                    stats_sink.append(cfg.ops.logits_stats(logits, lab, top_k=cfg.stats_top_k, **kw))
                lp, ls, _ = cfg.ops.logits_forward(logits, lab, log_sum_sq_out=_rows_of(log_sum_sq_out, rows), **kw)
            else:  # the plain head's tile merge (fused_head._tiled_forward), same order of operations
                target = ls = None
                tile_sq = [] if log_sum_sq_out is not None else None
                for tile in tiles:
                    logits = _logits(h, uc, weight, bias, factor, tile, buffer, cfg)
                    sq = None if tile_sq is None else torch.empty_like(lab, dtype=torch.float32)
                    tile_lp, tile_ls, _ = cfg.ops.logits_forward(logits, lab - tile.start, log_sum_sq_out=sq, **kw)
                    if tile_sq is not None:
                        tile_sq.append((sq, tile_ls))
                    in_tile = (lab >= tile.start) & (lab < tile.stop)
                    part = torch.where(in_tile, tile_lp + tile_ls, torch.zeros_like(tile_lp))
                    target = part if target is None else target + part
                    ls = tile_ls if ls is None else torch.logaddexp(ls, tile_ls)
                lp = target - ls
                if tile_sq is not None:  # log sum p^2 = logsumexp_t(log sum p_t^2 + 2 (lse_t - lse))
                    log_sum_sq_out[rows] = torch.stack([sq + 2.0 * (t_ls - ls) for sq, t_ls in tile_sq]).logsumexp(0)
            logp[rows], lse[rows] = lp, ls
        ctx.save_for_backward(hidden, weight, bias, u, factor, labels, index, lse)
        ctx.cfg = cfg
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, u, factor, labels, index, lse = ctx.saved_tensors
        cfg: HeadConfig = ctx.cfg
        need_h, need_w, need_b, need_u, need_f = ctx.needs_input_grad[:5]
        head = _GradAccumulator(hidden, index, weight, bias, need_h, need_w, need_b and bias is not None,
                                cfg.accumulate_fp32)
        update = _GradAccumulator(u, index, factor, None, need_u, need_f, False, cfg.accumulate_fp32)
        coef = grad_logp.float().contiguous()
        tiles = vocab_slices(weight.shape[0], cfg.vocab_tile)
        buffer = logits_buffer(labels, weight, cfg.rows_per_chunk, tiles[0].stop - tiles[0].start)
        for rows in chunk_slices(labels.shape[0], cfg.rows_per_chunk):
            h, uc = gather_rows(hidden, index, rows), gather_rows(u, index, rows)
            for vocab in tiles:
                logits = _logits(h, uc, weight, bias, factor, vocab, buffer, cfg)
                grad = cfg.ops.logits_grad_(logits, labels[rows] - vocab.start, lse[rows], coef[rows], None,
                                            vocab_size=weight.shape[0], **cfg.op_kwargs(rows))
                grad = _compute_dtype_grad(grad, hidden.dtype)
                head.add(rows, grad, h, vocab)      # grad_h_c = G W_t, grad_W_t += G^T h_c, grad_b_t += sum G
                update.add(rows, grad, uc, vocab)   # grad_u_c = G F_t, grad_F_t += G^T u_c
                del logits, grad
        grad_hidden, grad_weight, grad_bias = head.results()
        grad_u, grad_factor, _ = update.results()
        return grad_hidden, grad_weight, grad_bias, grad_u, grad_factor, None, None, None, None, None, None


class FusedHeadInForwardLowRank(torch.autograd.Function):
    """fused_head.FusedHeadInForward with the low-rank update: (objective 0-d, logp [M] without gradient), objective
    = sum_i coef_i logp_i with `coef_fn(rows, logp_chunk) -> coef [m]` called as each chunk's log-probs are known;
    the gradients with respect to hidden, weight, bias, u and factor are formed in forward (G of each chunk from
    the chunk op, then the same products as FusedLogprobsLowRank's backward) and backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, u, factor, labels, index, cfg: HeadConfig, coef_fn, needs_grad,
                chunks=None, log_sum_sq_out=None):
        """needs_grad: (hidden, weight, bias, u, factor) each needs a gradient; chunks: slices of whole groups;
        log_sum_sq_out [M]: each row's log sum_v p(v)^2 from the same chunks, written before coef_fn reads them."""
        if cfg.with_mean_logp:
            raise ValueError("low_rank: no mean_logp (label smoothing) with a low-rank update; use label_smoothing=0")
        need_h, need_w, need_b, need_u, need_f = needs_grad
        head = _GradAccumulator(hidden, index, weight, bias, need_h, need_w, need_b and bias is not None,
                                cfg.accumulate_fp32)
        update = _GradAccumulator(u, index, factor, None, need_u, need_f, False, cfg.accumulate_fp32)
        n_rows, whole = labels.shape[0], slice(0, weight.shape[0])
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        objective = torch.zeros((), dtype=torch.float64, device=hidden.device)
        chunks = chunk_slices(n_rows, cfg.rows_per_chunk) if chunks is None else chunks
        buffer = logits_buffer(labels, weight, max((c.stop - c.start for c in chunks), default=1))
        for rows in chunks:
            h, uc = gather_rows(hidden, index, rows), gather_rows(u, index, rows)
            logits = _logits(h, uc, weight, bias, factor, whole, buffer, cfg)
            terms = []

            def chunk_coefs(lp, _mean_logp, rows=rows):
                coef = coef_fn(rows, lp)
                terms.append((coef * lp).sum(dtype=torch.float64))
                return coef.float().contiguous(), None

            lp, _, _, grad = cfg.ops.logits_forward_grad_(logits, labels[rows], chunk_coefs,
                                                          log_sum_sq_out=_rows_of(log_sum_sq_out, rows),
                                                          **cfg.op_kwargs(rows))
            logp[rows] = lp
            objective += sum(terms)
            grad = _compute_dtype_grad(grad, hidden.dtype)
            head.add(rows, grad, h)
            update.add(rows, grad, uc)
            del logits, grad
        ctx.accs = (head, update)
        ctx.mark_non_differentiable(logp)
        return objective.float(), logp

    @staticmethod
    def backward(ctx, grad_objective, _grad_logp=None):
        head, update = ctx.accs
        ctx.accs = None  # release the buffers as soon as they are handed over
        grad_hidden, grad_weight, grad_bias = head.results(scale=grad_objective)
        grad_u, grad_factor, _ = update.results(scale=grad_objective)
        return grad_hidden, grad_weight, grad_bias, grad_u, grad_factor, None, None, None, None, None, None, None


__all__ = ["FusedHeadInForwardLowRank", "FusedLogprobsLowRank", "LowRank", "add_low_rank_", "check_low_rank"]
