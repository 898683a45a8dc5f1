"""The fused head: hidden [M, H] x weight [V, H] -> per-row log-probs, chunk by chunk, never the [M, V] logits.

Rows here are only the tokens that carry a label (the caller drops ignored rows before the matmul). Per chunk of
`rows_per_chunk` rows, torch does the matmul (cuBLAS on GPU) and a chunk op (`torch_ops` or `triton_ops`) does
the memory-bound rest. Two autograd Functions, one per memory/speed mode:

- `FusedLogprobs` (recompute): forward keeps only lse [M]; backward recomputes each chunk's logits (one extra
  matmul) once the upstream gradient of every log-prob is known. Works for any downstream objective.
- `FusedHeadInForward` (in-forward gradient): the upstream coefficients of each chunk are known as soon as the
  chunk's log-probs are (cross-entropy; a loss whose groups fit in a chunk), so the gradients with respect to
  hidden, weight and bias are formed during forward and backward only scales them. Saves the recompute matmul at
  the cost of holding grad_hidden [M, H] and grad_weight [V, H] (float32) from forward to backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from prefuse.kernels import torch_ops
from prefuse.kernels.rows import gather_rows

CoefFn = Callable[[slice, torch.Tensor, "torch.Tensor | None"], "tuple[torch.Tensor, torch.Tensor | None]"]


@dataclass(frozen=True)
class HeadConfig:
    """How the head is computed. `backend` is resolved ("torch" or "triton"); `block_v` overrides the Triton tile."""

    rows_per_chunk: int
    backend: str = "torch"
    vocab_tile: int | None = None  # recompute path only: tile the vocabulary of each row chunk
    # a float, or a float32 tensor [M]: one inverse temperature per kept row (in the Function's row order)
    inv_temperature: float | torch.Tensor = 1.0
    softcap: float | None = None
    with_mean_logp: bool = False  # also return mean_v logp (label smoothing)
    accumulate_fp32: bool = True  # weight/bias gradients summed over chunks in float32
    block_v: int | None = None
    stats_top_k: int | None = None  # also compute per-token statistics from the forward's chunks

    @property
    def ops(self):
        if self.backend == "triton":
            from prefuse.kernels import triton_ops

            return triton_ops
        return torch_ops

    @property
    def columns(self) -> bool:
        """The torch backend works on [V, m] chunks (faster matmuls on the CPU); Triton kernels on [m, V]."""
        return self.backend == "torch"

    @property
    def per_row_temperature(self) -> bool:
        return isinstance(self.inv_temperature, torch.Tensor)

    def inv_temp(self, rows: slice, copies: int = 1):
        """The inverse temperature of the kept rows `rows`: the float, or their [m] values (repeated `copies`
        times for a chunk that stacks the same rows of several models)."""
        if not self.per_row_temperature:
            return self.inv_temperature
        values = self.inv_temperature[rows]
        return values if copies == 1 else values.repeat(copies)

    def op_kwargs(self, rows: slice | None = None, copies: int = 1) -> dict:
        """The chunk ops' keyword arguments for the kept rows `rows` (the whole call when None)."""
        kw = {"inv_temperature": self.inv_temp(slice(None) if rows is None else rows, copies),
              "softcap": self.softcap}
        if self.backend == "triton" and self.block_v is not None:
            kw["block_v"] = self.block_v
        return kw


def chunk_slices(n_rows: int, rows_per_chunk: int) -> list[slice]:
    return [slice(s, min(s + rows_per_chunk, n_rows)) for s in range(0, n_rows, rows_per_chunk)]


def vocab_slices(vocab: int, tile: int | None) -> list[slice]:
    """The vocabulary tiles: one whole-vocabulary slice when `tile` is None."""
    return [slice(0, vocab)] if tile is None or tile >= vocab else chunk_slices(vocab, tile)


def _tile(weight: torch.Tensor, bias: torch.Tensor | None, vocab: slice):
    return weight[vocab], None if bias is None else bias[vocab]


def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 out: torch.Tensor | None = None, columns: bool = False, shift: torch.Tensor | None = None,
                 alpha: float | torch.Tensor = 1.0) -> torch.Tensor:
    """logits [m, V] = hidden_chunk [m, H] @ weight.T (+ bias), in the compute dtype.

    out: a scratch buffer of at least m * V elements reused by every chunk (no allocator churn or page faults per
    chunk). columns: compute weight @ hidden_chunk.T into a [V, m] buffer and return its transposed view (the
    torch backend's layout, see torch_ops). shift [m] (columns only): return alpha * (logits) + shift per row,
    the shift added by the matmul itself (addmm's input), not by a pass over the chunk; alpha a float or [m] (one
    per row: the rows of hidden_chunk are scaled, an [m, H] copy, before the matmul)."""
    m, vocab = hidden_chunk.shape[0], weight.shape[0]
    if shift is not None:
        assert columns, "shift: the [V, m] layout only"
        target = None if out is None else out.view(-1)[: m * vocab].view(vocab, m)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.to(hidden_chunk.dtype)
            hidden_chunk = hidden_chunk * alpha[:, None]
            base = shift[None, :].expand(vocab, m) if bias is None else torch.addcmul(
                shift[None, :], bias[:, None], alpha[None, :], out=target)
            return torch.addmm(base, weight, hidden_chunk.t(), out=target).t()
        if bias is None:
            base = shift[None, :].expand(vocab, m)
        else:
            base = torch.add(bias[:, None] * alpha, shift[None, :], out=target)
        return torch.addmm(base, weight, hidden_chunk.t(), alpha=alpha, out=target).t()
    if columns:
        target = None if out is None else out.view(-1)[: m * vocab].view(vocab, m)
        if bias is None:
            return torch.mm(weight, hidden_chunk.t(), out=target).t()
        return torch.addmm(bias[:, None], weight, hidden_chunk.t(), out=target).t()
    target = None if out is None else out.view(-1)[: m * vocab].view(m, vocab)
    if bias is None:
        return torch.mm(hidden_chunk, weight.t(), out=target)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=target)


def logits_buffer(labels: torch.Tensor, weight: torch.Tensor, rows_per_chunk: int,
                  width: int | None = None) -> torch.Tensor:
    """The scratch buffer of min(M, rows_per_chunk) * width elements (labels [M]; width: the vocabulary tile,
    default the whole vocabulary) that chunk_logits writes into."""
    width = weight.shape[0] if width is None else width
    return torch.empty(min(labels.shape[0], rows_per_chunk) * width, dtype=weight.dtype, device=weight.device)


def _tiled_forward(hidden_chunk, labels, weight, bias, tiles, buffer, cfg: HeadConfig, rows: slice,
                   log_sum_sq_out: torch.Tensor | None = None):
    """logp, lse, mean_logp [m] of one row chunk (the kept rows `rows`) from its vocabulary tiles: the tiles'
    logsumexps merge with logaddexp; the label's logit comes from the tile that holds it (tile-local labels
    elsewhere match nothing). log_sum_sq_out [m]: each tile's log sum p_t^2 under its own softmax p_t merges as
    log sum_v p(v)^2 = logsumexp_t(log sum p_t^2 + 2 (lse_t - lse))."""
    vocab = weight.shape[0]
    lse = target = sum_z = None
    tile_sq = [] if log_sum_sq_out is not None else None
    for tile in tiles:
        w_tile, b_tile = _tile(weight, bias, tile)
        logits = chunk_logits(hidden_chunk, w_tile, b_tile, out=buffer, columns=cfg.columns)
        sq = None if tile_sq is None else torch.empty_like(labels, dtype=torch.float32)
        lp, ls, ml = cfg.ops.logits_forward(logits, labels - tile.start, with_mean_logp=cfg.with_mean_logp,
                                            log_sum_sq_out=sq, **cfg.op_kwargs(rows))
        if tile_sq is not None:
            tile_sq.append((sq, ls))
        in_tile = (labels >= tile.start) & (labels < tile.stop)
        part = torch.where(in_tile, lp + ls, torch.zeros_like(lp))
        target = part if target is None else target + part
        lse = ls if lse is None else torch.logaddexp(lse, ls)
        if ml is not None:
            part_z = (ml + ls) * (tile.stop - tile.start)
            sum_z = part_z if sum_z is None else sum_z + part_z
    if tile_sq is not None:
        log_sum_sq_out.copy_(torch.stack([sq + 2.0 * (ls - lse) for sq, ls in tile_sq]).logsumexp(0))
    return target - lse, lse, (None if sum_z is None else sum_z / vocab - lse)


class _GradAccumulator:
    """Gradient buffers for hidden [N, H], weight [V, H] and bias [V]; one weight buffer for all chunks.
    With a row index, only the kept rows of grad_hidden are written (the others are zero)."""

    def __init__(self, hidden, index, weight, bias, need_hidden, need_weight, need_bias, accumulate_fp32):
        acc = torch.float32 if accumulate_fp32 and weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        self.weight_dtype = weight.dtype
        self.weight = weight
        self.index = index
        self.grad_hidden = None
        if need_hidden:
            self.grad_hidden = torch.empty_like(hidden) if index is None else torch.zeros_like(hidden)
        # allocated, not zeroed: the first chunk writes it (saves a pass over V x H)
        self.grad_weight = torch.empty(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        self.first = True
        self.grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_bias else None

    def add(self, rows: slice, grad_logits: torch.Tensor, hidden_chunk: torch.Tensor,
            vocab: slice = slice(None)) -> None:
        """grad_logits [m, Vt] in the compute dtype for the rows `rows` and the vocabulary tile `vocab` (the whole
        vocabulary by default), hidden_chunk [m, H]. Row chunks visit the tiles in the same order, so the first
        row chunk writes each tile of grad_weight and the first tile writes each row chunk of grad_hidden."""
        first_rows, first_tile = rows.start == 0, vocab.start in (None, 0)
        weight = self.weight[vocab]
        if self.grad_hidden is not None:
            if self.index is None:
                out = self.grad_hidden[rows]
                torch.mm(grad_logits, weight, out=out) if first_tile else out.addmm_(grad_logits, weight)
            elif first_tile:
                self.grad_hidden.index_copy_(0, self.index[rows], grad_logits @ weight)
            else:
                self.grad_hidden.index_add_(0, self.index[rows], grad_logits @ weight)
        if self.grad_weight is not None:
            out = self.grad_weight[vocab]
            if out.dtype == grad_logits.dtype:
                torch.mm(grad_logits.t(), hidden_chunk, out=out) if first_rows else out.addmm_(grad_logits.t(),
                                                                                                 hidden_chunk)
            else:  # low-precision product per chunk, summed in float32 across chunks
                product = grad_logits.t() @ hidden_chunk
                out.copy_(product) if first_rows else out.add_(product)
        if self.grad_bias is not None:
            self.grad_bias[vocab].add_(grad_logits.sum(0, dtype=self.grad_bias.dtype))
        self.first = False

    def hidden_rows(self, rows: slice) -> torch.Tensor | None:
        """The rows of grad_hidden that the kept rows `rows` write, as a view when they are contiguous (no row
        index), else None."""
        return self.grad_hidden[rows] if self.index is None else None

    def put_hidden_rows(self, rows: slice, block: torch.Tensor) -> None:
        """Writes block [m, H] (any float dtype, cast to grad_hidden's) into grad_hidden at the kept rows `rows`."""
        if self.index is None:
            self.grad_hidden[rows] = block
        else:
            self.grad_hidden.index_copy_(0, self.index[rows], block.to(self.grad_hidden.dtype))

    def results(self, scale: torch.Tensor | None = None):
        """The gradients in the parameters' dtype, scaled in place by the upstream scalar when given."""
        out = []
        if self.first and self.grad_weight is not None:  # no chunk was added
            self.grad_weight.zero_()
        for g in (self.grad_hidden, self.grad_weight, self.grad_bias):
            if g is not None:
                if scale is not None and not bool(scale == 1):
                    g.mul_(scale.to(g.dtype))
                g = g.to(self.weight_dtype)
            out.append(g)
        return out


def _rows_of(values: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The view of an optional per-row output at the kept rows `rows`."""
    return None if values is None else values[rows]


def _compute_dtype_grad(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return grad if grad.dtype == dtype else grad.to(dtype)


def _folds(cfg: HeadConfig, weight: torch.Tensor) -> bool:
    """The torch backend's folded recompute: float32/64 chunks without softcap (see torch_ops.folded_shift)."""
    return cfg.backend == "torch" and cfg.softcap is None and weight.dtype == torch.float32


def _folded_backward(hidden, weight, bias, labels, index, lse, coef_t, coef_u, cfg: HeadConfig, tiles,
                     acc: _GradAccumulator) -> None:
    """The recompute backward of the torch backend with one pass over each chunk (torch_ops.folded_shift): per row
    chunk and vocabulary tile, U [Vt, m] = exp(addmm(shift, W_t, h^T)) + onehot terms; grad_hidden rows =
    row_scale * sum_t U^T W_t (summed over the tiles in one [m, H] block, written once), grad_weight tile +=
    U (row_scale * h), grad_bias tile += U row_scale."""
    ops, vocab = cfg.ops, weight.shape[0]
    buffer = logits_buffer(labels, weight, cfg.rows_per_chunk, tiles[0].stop - tiles[0].start)
    grad_hidden = acc.grad_hidden
    # increasing kept rows (select_labeled_rows' nonzero): each chunk's grad_hidden rows are summed in place at
    # their compact rows and spread at the end; another order sums them in an [m, H] block
    compact = index is None or index.shape[0] < 2 or bool((index[1:] > index[:-1]).all())
    for rows in chunk_slices(labels.shape[0], cfg.rows_per_chunk):
        h, lab, m = gather_rows(hidden, index, rows), labels[rows], rows.stop - rows.start
        cu = None if coef_u is None else coef_u[rows]
        t = cfg.inv_temp(rows)
        shift, row_scale = ops.folded_shift(lse[rows], coef_t[rows], cu, t)
        shift, row_scale = shift.to(weight.dtype), row_scale.to(weight.dtype)
        if isinstance(t, torch.Tensor):
            t = t.to(weight.dtype)
        # grad_weight's operand diag(row_scale) h: the signs flip the rows of the gathered copy in place (exactly,
        # and back after each tile), a scalar t goes into alpha; a view of the caller's hidden is copied instead,
        # and so is every chunk under per-row temperatures (row_scale = t s in the copy, alpha 1)
        sign = row_scale.sign()[:, None] if acc.grad_weight is not None else None
        h_signed = None if sign is None or index is not None else h * sign
        grad_alpha = t
        if sign is not None and isinstance(t, torch.Tensor):
            h_signed, grad_alpha = h * row_scale[:, None], 1.0
        # grad_hidden's rows of the chunk, summed over the tiles in place: at the chunk's own (compact) rows, moved
        # to the kept rows' places at the end (no [m, H] block beside the chunk's buffers)
        block = None
        if grad_hidden is not None:
            block = grad_hidden[rows] if compact else hidden.new_empty(m, hidden.shape[1])
        for k, tile in enumerate(tiles):
            w_tile, b_tile = _tile(weight, bias, tile)
            buf = chunk_logits(h, w_tile, b_tile, out=buffer, columns=True, shift=shift, alpha=t).t()
            u = ops.folded_grad_(buf, lab - tile.start, coef_t[rows], cu, row_scale, vocab)
            if block is not None:
                torch.mm(u.t(), w_tile, out=block) if k == 0 else block.addmm_(u.t(), w_tile)
            if acc.grad_weight is not None:
                out = acc.grad_weight[tile]
                hs = h.mul_(sign) if h_signed is None else h_signed
                torch.addmm(out, u, hs, beta=0.0 if rows.start == 0 else 1.0, alpha=grad_alpha, out=out)
                if h_signed is None:
                    h.mul_(sign)
            if acc.grad_bias is not None:
                acc.grad_bias[tile].add_(u.mv(row_scale))
        if block is not None:
            block.mul_(row_scale[:, None])
            if not compact:
                grad_hidden.index_copy_(0, index[rows], block)
    acc.first = labels.shape[0] == 0
    if grad_hidden is not None and index is not None and compact:
        del buffer
        _spread_rows_(grad_hidden, index, cfg.rows_per_chunk)


def _spread_rows_(grad: torch.Tensor, index: torch.Tensor, rows_per_chunk: int) -> None:
    """grad [N, H] holds the kept rows' values at rows 0..M-1; moves row j to index[j] (increasing, so
    index[j] >= j: going from the last chunk to the first never overwrites a row still to be moved) and zeroes
    the rows that are not in index."""
    for rows in reversed(chunk_slices(index.shape[0], rows_per_chunk)):
        grad.index_copy_(0, index[rows], grad[rows].clone())
    kept = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
    kept[index] = True
    grad.masked_fill_(~kept[:, None], 0)


class FusedLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], bias [V] | None, labels [M], index [M] | None (the kept rows of hidden; None:
    all N) -> logp [M] float32 (, mean_logp [M])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, cfg: HeadConfig, chunks=None, stats_sink=None,
                log_sum_sq_out=None):
        """chunks: slices of the M rows (default: rows_per_chunk each); a caller that needs results bitwise equal
        to another pass over the same rows (a reference beside its policy) passes that pass's chunks.
        stats_sink: a list that receives each chunk's statistics (dicts of [m] tensors, see TokenStats) when
        cfg.stats_top_k is set; they are read from the same logits chunks (whole-vocabulary rows only).
        log_sum_sq_out [M] float32: receives log sum_v p(v)^2 of each row from the same chunks (no gradient)."""
        n_rows = labels.shape[0]
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        mean_logp = torch.empty_like(logp) if cfg.with_mean_logp else None
        vocab = weight.shape[0]
        tiles = vocab_slices(vocab, cfg.vocab_tile)
        chunks = chunk_slices(n_rows, cfg.rows_per_chunk) if chunks is None else chunks
        longest = max((c.stop - c.start for c in chunks), default=1)
        buffer = logits_buffer(labels, weight, longest, tiles[0].stop - tiles[0].start)
        for rows in chunks:
            h, lab = gather_rows(hidden, index, rows), labels[rows]
            if len(tiles) == 1:
                logits = chunk_logits(h, weight, bias, out=buffer, columns=cfg.columns)
                if cfg.stats_top_k is not None:
                    stats_sink.append(cfg.ops.logits_stats(logits, lab, top_k=cfg.stats_top_k,
                                                           **cfg.op_kwargs(rows)))
                lp, ls, ml = cfg.ops.logits_forward(logits, lab, with_mean_logp=cfg.with_mean_logp,
                                                    log_sum_sq_out=_rows_of(log_sum_sq_out, rows),
                                                    **cfg.op_kwargs(rows))
            else:
                lp, ls, ml = _tiled_forward(h, lab, weight, bias, tiles, buffer, cfg, rows,
                                            _rows_of(log_sum_sq_out, rows))
            logp[rows], lse[rows] = lp, ls
            if ml is not None:
                mean_logp[rows] = ml
        ctx.save_for_backward(hidden, weight, bias, labels, index, lse)
        ctx.cfg = cfg
        if mean_logp is None:
            return logp
        return logp, mean_logp

    @staticmethod
    def backward(ctx, grad_logp, grad_mean_logp=None):
        hidden, weight, bias, labels, index, lse = ctx.saved_tensors
        cfg: HeadConfig = ctx.cfg
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc = _GradAccumulator(hidden, index, weight, bias, need_h, need_w, need_b and bias is not None,
                               cfg.accumulate_fp32)
        coef_t = torch.zeros_like(lse) if grad_logp is None else grad_logp.float().contiguous()
        coef_u = None if grad_mean_logp is None else grad_mean_logp.float().contiguous()
        tiles = vocab_slices(weight.shape[0], cfg.vocab_tile)
        if _folds(cfg, weight):
            _folded_backward(hidden, weight, bias, labels, index, lse, coef_t, coef_u, cfg, tiles, acc)
            return (*acc.results(), None, None, None, None, None, None)
        buffer = logits_buffer(labels, weight, cfg.rows_per_chunk, tiles[0].stop - tiles[0].start)
        for rows in chunk_slices(labels.shape[0], cfg.rows_per_chunk):
            h = gather_rows(hidden, index, rows)
            for vocab in tiles:
                w_tile, b_tile = _tile(weight, bias, vocab)
                logits = chunk_logits(h, w_tile, b_tile, out=buffer, columns=cfg.columns)
                grad = cfg.ops.logits_grad_(logits, labels[rows] - vocab.start, lse[rows], coef_t[rows],
                                            None if coef_u is None else coef_u[rows], vocab_size=weight.shape[0],
                                            **cfg.op_kwargs(rows))
                acc.add(rows, _compute_dtype_grad(grad, hidden.dtype), h, vocab)
                del logits, grad
        grad_hidden, grad_weight, grad_bias = acc.results()
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


class FusedHeadInForward(torch.autograd.Function):
    """Forward that also forms the gradients (in-forward-gradient mode).

    Returns (objective, logp [M], mean_logp [M] or [0] when not asked for) where objective = sum_i A_i logp_i + B_i mean_logp_i and
    `coef_fn(rows, logp_chunk, mean_logp_chunk) -> (A_chunk, B_chunk | None)` gives the coefficients chunk by chunk.
    Only `objective` is differentiable; its gradient is the one formed in forward, scaled by the upstream scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, cfg: HeadConfig, coef_fn: CoefFn, needs_grad,
                chunks=None, log_sum_sq_out=None):
        """hidden [N, H], labels [M] and index [M] | None as in FusedLogprobs. chunks: slices of the M rows to
        process (default: rows_per_chunk each); callers whose coefficients need whole groups of rows (the pairs
        of a preference loss) pass slices aligned to the groups. log_sum_sq_out [M] as in FusedLogprobs: each
        chunk's rows are written before coef_fn is called on the chunk (a coefficient may read them)."""
        n_rows = labels.shape[0]
        need_h, need_w, need_b = needs_grad
        acc = _GradAccumulator(hidden, index, weight, bias, need_h, need_w, need_b and bias is not None,
                               cfg.accumulate_fp32)
        logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        mean_logp = torch.empty_like(logp) if cfg.with_mean_logp else logp.new_empty(0)
        objective = torch.zeros((), dtype=torch.float64, device=hidden.device)
        chunks = chunk_slices(n_rows, cfg.rows_per_chunk) if chunks is None else chunks
        buffer = logits_buffer(labels, weight, max((c.stop - c.start for c in chunks), default=1))
        for rows in chunks:
            h = gather_rows(hidden, index, rows)
            logits = chunk_logits(h, weight, bias, out=buffer, columns=cfg.columns)
            terms = []

            def chunk_coefs(lp, ml, rows=rows):
                coef_t, coef_u = coef_fn(rows, lp, ml)
                terms.append((coef_t * lp).sum(dtype=torch.float64))
                if coef_u is not None:
                    terms.append((coef_u * ml).sum(dtype=torch.float64))
                return coef_t.float().contiguous(), None if coef_u is None else coef_u.float().contiguous()

            lp, _, ml, grad = cfg.ops.logits_forward_grad_(logits, labels[rows], chunk_coefs,
                                                           with_mean_logp=cfg.with_mean_logp,
                                                           log_sum_sq_out=_rows_of(log_sum_sq_out, rows),
                                                           **cfg.op_kwargs(rows))
            logp[rows] = lp
            if ml is not None:
                mean_logp[rows] = ml
            objective += sum(terms)
            acc.add(rows, _compute_dtype_grad(grad, hidden.dtype), h)
            del logits, grad
        ctx.acc = acc
        ctx.mark_non_differentiable(logp, mean_logp)
        return objective.float(), logp, mean_logp

    @staticmethod
    def backward(ctx, grad_objective, _grad_logp=None, _grad_mean_logp=None):
        acc: _GradAccumulator = ctx.acc
        grad_hidden, grad_weight, grad_bias = acc.results(scale=grad_objective)
        ctx.acc = None  # release the buffers as soon as they are handed over
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None


def _frozen_tiled_chunk(h, lab, weight, bias, tiles, buffer, cfg: HeadConfig, basis_rows: int, inv_temperature,
                        log_sum_sq_out: torch.Tensor | None = None):
    """(logp [m], basis [basis_rows, H] float32) of one row chunk h [m, H] (labels lab [m], inv_temperature a
    float or [m]) from its vocabulary tiles with an online softmax (torch_ops.basis_tile_): the first basis_rows
    rows form a basis; log_sum_sq_out [basis_rows] receives their log sum_v p(v)^2 (under the same running max)."""
    m = h.shape[0]
    run_max = torch.full((m,), float("-inf"), dtype=torch.float32, device=h.device)
    run_sum = torch.zeros(m, dtype=torch.float32, device=h.device)
    run_sum_sq = None if log_sum_sq_out is None else torch.zeros_like(run_sum)
    target = torch.zeros(m, dtype=torch.float32, device=h.device)
    acc = torch.zeros(basis_rows, weight.shape[1], dtype=torch.float32, device=h.device)
    for tile in tiles:
        w_tile, b_tile = _tile(weight, bias, tile)
        logits = chunk_logits(h, w_tile, b_tile, out=buffer, columns=cfg.columns)
        target += torch_ops.basis_tile_(logits, lab - tile.start, w_tile, run_max, run_sum, acc,
                                        inv_temperature=inv_temperature, run_sum_sq=run_sum_sq)
    if run_sum_sq is not None:
        log_sum_sq_out.copy_((run_sum_sq.log() - 2.0 * run_sum.log())[:basis_rows])
    lse = run_max + run_sum.log()
    # basis = t (w_label - sum_v softmax_v w_v); the label rows go into the logits buffer, free after the last tile
    width = basis_rows * weight.shape[1]
    into = buffer[:width].view(basis_rows, -1) if buffer.numel() >= width else None  # H > tile width: a new one
    w_label = torch.index_select(weight, 0, lab[:basis_rows], out=into)
    basis = acc.div_(run_sum[:basis_rows, None]).neg_().add_(w_label)
    if isinstance(inv_temperature, torch.Tensor):
        basis.mul_(inv_temperature[:basis_rows, None])
    elif inv_temperature != 1.0:
        basis.mul_(inv_temperature)
    return target - lse, basis


def _frozen_chunks(cfg: HeadConfig, weight: torch.Tensor, n_rows: int, chunks: list[slice] | None):
    """(row chunks, vocabulary tiles or None) of a frozen-weight pass. A plan with vocabulary tiles runs them with
    an online softmax where the torch backend folds (float32, no softcap) and no statistics are asked for;
    elsewhere whole-vocabulary rows, fewer per chunk, in a buffer of the tiles' size (the caller's chunks are
    then dropped)."""
    vocab, rows_per_chunk, tiles = weight.shape[0], cfg.rows_per_chunk, None
    if cfg.vocab_tile is not None and cfg.vocab_tile < vocab:
        if _folds(cfg, weight) and cfg.stats_top_k is None:  # the online softmax over vocabulary tiles
            tiles = vocab_slices(vocab, cfg.vocab_tile)
        else:  # whole-vocabulary rows (softcap, bf16, Triton, statistics) in a buffer of the tiles' size
            rows_per_chunk = max(1, cfg.rows_per_chunk * cfg.vocab_tile // vocab)
            chunks = None
    return (chunk_slices(n_rows, rows_per_chunk) if chunks is None else chunks), tiles


class _BasisPass:
    """One forward of the frozen-weight head: per row chunk, the log-probs into `logp` (and the reference's into
    `ref_logp`) and the gradient basis of the policy's rows into `acc.grad_hidden`.

    With ref_hidden a chunk holds its m policy rows, then the reference's m rows at the same positions."""

    def __init__(self, hidden, weight, bias, labels, index, cfg: HeadConfig, chunks, ref_hidden,
                 log_sum_sq_out=None):
        self.hidden, self.weight, self.bias, self.labels, self.index = hidden, weight, bias, labels, index
        self.cfg, self.log_sum_sq_out = cfg, log_sum_sq_out
        self.ref_hidden, self.shared = ref_hidden, ref_hidden is not None
        n_rows, vocab = labels.shape[0], weight.shape[0]
        self.chunks, self.tiles = _frozen_chunks(cfg, weight, n_rows, chunks)
        self.folds = _folds(cfg, weight)
        self.acc = _GradAccumulator(hidden, index, weight, None, True, False, False, cfg.accumulate_fp32)
        self.logp = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)
        self.ref_logp = torch.empty_like(self.logp) if self.shared else None
        longest = max((c.stop - c.start for c in self.chunks), default=1)
        per_chunk = 2 * longest if self.shared else longest
        width = vocab if self.tiles is None else cfg.vocab_tile
        self.buffer = torch.empty(per_chunk * width, dtype=weight.dtype, device=weight.device)  # [per_chunk, width]
        self.ones = torch.ones(per_chunk, dtype=torch.float32, device=hidden.device)

    def run(self, stats_sink: list | None) -> None:
        for rows in self.chunks:
            h, lab = self.chunk_rows(rows)
            if self.tiles is not None:
                lp = self.tiled_chunk(rows, h, lab)
            else:
                lp = self.whole_vocab_chunk(rows, h, lab, stats_sink)
            self.write_logp(rows, lp)

    def chunk_rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """(h [m or 2m, H], labels [m or 2m]): the policy's rows of the chunk, then the reference's."""
        h, lab = gather_rows(self.hidden, self.index, rows), self.labels[rows]
        if self.shared:
            h = torch.cat([h, gather_rows(self.ref_hidden, self.index, rows)])
            lab = torch.cat([lab, lab])
        return h, lab

    def write_logp(self, rows: slice, lp: torch.Tensor) -> None:
        """lp [m or 2m]: the policy's log-probs of the chunk's rows, then the reference's."""
        m = rows.stop - rows.start
        self.logp[rows] = lp[:m]
        if self.shared:
            self.ref_logp[rows] = lp[m:]

    def tiled_chunk(self, rows: slice, h: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        """The online softmax over vocabulary tiles (torch backend, float32, no softcap)."""
        lp, basis = _frozen_tiled_chunk(h, lab, self.weight, self.bias, self.tiles, self.buffer, self.cfg,
                                        rows.stop - rows.start, self.cfg.inv_temp(rows, 2 if self.shared else 1),
                                        _rows_of(self.log_sum_sq_out, rows))
        self.acc.put_hidden_rows(rows, basis)
        return lp

    def whole_vocab_chunk(self, rows: slice, h: torch.Tensor, lab: torch.Tensor,
                          stats_sink: list | None) -> torch.Tensor:
        """The chunk's logits over the whole vocabulary, its statistics when asked for, then its basis."""
        cfg, m = self.cfg, rows.stop - rows.start
        copies = 2 if self.shared else 1
        logits = chunk_logits(h, self.weight, self.bias, out=self.buffer, columns=cfg.columns)
        if cfg.stats_top_k is not None:  # before the ops below, which overwrite the logits in place
            stats_sink.append(cfg.ops.logits_stats(logits[:m], lab[:m], top_k=cfg.stats_top_k,
                                                   **cfg.op_kwargs(rows)))
        # log sum p^2 of every row of the chunk (the reference's too, when stacked), the policy's kept
        sum_sq = None if self.log_sum_sq_out is None else torch.empty(lab.shape[0], device=h.device)
        if self.folds:  # one pass fewer: the row normalization goes onto the [m, H] product
            lp, _, u, row_scale = torch_ops.logits_forward_basis_(logits, lab, inv_temperature=cfg.inv_temp(
                rows, copies), log_sum_sq_out=sum_sq)
            if sum_sq is not None:
                self.log_sum_sq_out[rows] = sum_sq[:m]
            u, row_scale = u[:m], row_scale[:m]
            target = self.acc.hidden_rows(rows)  # written in place where the rows are contiguous
            block = torch.mm(u, self.weight, out=target).mul_(row_scale[:, None])
            if target is None:
                self.acc.put_hidden_rows(rows, block)
            return lp
        # the in-forward op with coefficient 1 per row: dz = onehot - softmax, through the transform
        ones = self.ones[:lab.shape[0]]
        lp, _, _, grad = cfg.ops.logits_forward_grad_(logits, lab, lambda _lp, _ml: (ones, None),
                                                      log_sum_sq_out=sum_sq, **cfg.op_kwargs(rows, copies))
        if sum_sq is not None:
            self.log_sum_sq_out[rows] = sum_sq[:m]
        self.acc.add(rows, _compute_dtype_grad(grad[:m], self.hidden.dtype), h[:m])  # basis rows = dz @ W
        return lp


class FusedLogprobsFrozenWeight(torch.autograd.Function):
    """hidden [N, H] (needs a gradient), weight [V, H] and bias [V] | None (need none), labels [M], index [M] | None
    as in FusedLogprobs -> logp [M] float32; with ref_hidden [N, H] (a reference through the same lm_head: LoRA's
    base model) -> (logp [M], ref_logp [M] without gradient).

    The basis is held as hidden-shaped [N, H] in hidden's dtype (zero at the rows not in index): the size and dtype
    of the grad_hidden the recompute path allocates in backward, here allocated in forward, and backward scales it
    in place (peak: the same one [N, H] buffer). In bf16/fp16 the scaled gradient is rounded twice (the basis, then
    the product) where the recompute path rounds dz once before its matmul. Backward can run once (the basis is
    consumed); label smoothing's mean_logp needs a second basis and is refused. With cfg.vocab_tile (the torch
    backend in float32 without softcap) each row chunk runs over vocabulary tiles with an online softmax: the
    running max and sum per row and the running sum of exp(z - max) w_v [m, H], rescaled when the max grows
    (`torch_ops.basis_tile_`); elsewhere a tiled plan runs whole-vocabulary rows in a buffer of the tiles' size.

    With ref_hidden each chunk holds the plan's m policy rows and the reference's m rows at the same positions: one
    logits matmul reads the weight once for both models (two weight reads per chunk instead of three: logits and
    basis, where separate passes read it for the policy's logits, its basis and the reference's logits), only the
    policy's rows form a basis, and the logits buffer holds 2m rows (twice the plan's)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, index, cfg: HeadConfig, chunks=None, stats_sink=None,
                ref_hidden=None, log_sum_sq_out=None):
        """chunks, stats_sink and log_sum_sq_out as in FusedLogprobs.forward (cfg.stats_top_k: statistics from
        the same chunks, of the policy's rows; log_sum_sq_out: the policy's rows)."""
        if cfg.with_mean_logp:
            raise ValueError("with_mean_logp: the frozen-weight mode holds one basis per row (no mean_logp); use "
                             "mode='recompute' or 'in_forward' with label smoothing")
        if ref_hidden is not None and ref_hidden.shape != hidden.shape:
            raise ValueError(f"ref_hidden: {tuple(ref_hidden.shape)} must equal hidden's {tuple(hidden.shape)}")
        basis_pass = _BasisPass(hidden, weight, bias, labels, index, cfg, chunks, ref_hidden, log_sum_sq_out)
        basis_pass.run(stats_sink)
        ctx.basis = basis_pass.acc.grad_hidden
        ctx.shared = basis_pass.shared
        ctx.save_for_backward(index)
        if basis_pass.shared:
            ctx.mark_non_differentiable(basis_pass.ref_logp)
            return basis_pass.logp, basis_pass.ref_logp
        return basis_pass.logp

    @staticmethod
    def backward(ctx, grad_logp, *_):
        (index,) = ctx.saved_tensors
        basis, ctx.basis = ctx.basis, None  # consumed: scaled in place and handed over
        if basis is None:
            raise RuntimeError("the frozen-weight head's basis was consumed by an earlier backward; use "
                               "mode='recompute' to backward through it twice")
        scale = grad_logp.float()
        if index is not None:  # per hidden row; 0 for the rows without a label (their basis is 0)
            scale = torch.zeros(basis.shape[0], dtype=torch.float32, device=basis.device).index_copy_(0, index, scale)
        basis.mul_(scale[:, None])  # float32 product, rounded once to hidden's dtype
        return basis, None, None, None, None, None, None, None, None, None
