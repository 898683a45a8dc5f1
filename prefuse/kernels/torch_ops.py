"""Chunk operations on a block of raw logits, in plain torch.

Every function here has a Triton twin in `triton_ops` with the same signature; `fused_head` picks one.
A chunk is `logits [m, V]`: the matmul output `hidden_chunk @ weight.T (+ bias)` in the compute dtype. It is the
driver's scratch buffer: these functions may overwrite it (float32 chunks are transformed in place, which keeps the
peak at one chunk). Work is done in float32 whatever the compute dtype.

Layout: `logits` may be row-major (vocabulary contiguous) or the transposed view of a [V, m] buffer (tokens
contiguous). The torch backend uses the second: on the CPU, `weight @ hidden.T` and the gradient matmuls that read
a [V, m] buffer run about 8% faster than their row-major counterparts (bench/). Each function works on the
contiguous buffer behind the view, reducing over its vocabulary dimension `vdim`.

The logit transform, applied in this order (Gemma-2 caps the logits before any sampling temperature):
    z = softcap * tanh(x / softcap)   (when softcap is given)
    z = z / temperature
`inv_temperature` is a float (every row) or a float32 tensor [m], one value per row of the chunk.

`log_sum_sq_out` [m] (where a function takes it) receives log sum_v p(v)^2 of each row from the same pass:
sum_v exp(2 (z - max)) summed beside sum_v exp(z - max) under the same max, so that
log sum_v p(v)^2 = log sum exp(2 (z - max)) - 2 log sum exp(z - max) (every term <= 1, no overflow).
"""
from __future__ import annotations

import torch


# Blocks of about this many bytes stay in a core's L2 cache across the several elementwise passes of a softmax.
BLOCK_BYTES = 1 << 20


def _buffer(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The contiguous buffer behind z [m, V] and its vocabulary dimension (1: [m, V]; 0: [V, m])."""
    if z.is_contiguous():
        return z, 1
    if z.t().is_contiguous():
        return z.t(), 0
    return z.contiguous(), 1


def _blocks(buf: torch.Tensor) -> list[slice]:
    """Slices along dim 0 of buf, about BLOCK_BYTES each."""
    step = max(1, BLOCK_BYTES // (4 * buf.shape[1]))
    return [slice(s, min(s + step, buf.shape[0])) for s in range(0, buf.shape[0], step)]


def _scale_rows_(buf: torch.Tensor, vdim: int, inv_temperature) -> None:
    """buf *= inv_temperature: a float, or a tensor [m] (one value per row)."""
    if isinstance(inv_temperature, torch.Tensor):
        buf.mul_(_per_token(inv_temperature.to(buf.dtype), vdim))
    elif inv_temperature != 1.0:
        buf.mul_(inv_temperature)


def _transform(logits: torch.Tensor, inv_temperature, softcap: float | None, keep_tanh: bool = False):
    """(buf, vdim, tanh): the float32 logits after the transform as a contiguous buffer (the input's own memory
    when float32), and tanh(x / softcap) when capped and `keep_tanh` (the backward's chain rule needs it)."""
    buf, vdim = _buffer(logits.float())
    tanh = None
    if softcap is not None:
        buf.div_(softcap).tanh_()
        tanh = buf.clone() if keep_tanh else None
        buf.mul_(softcap)
    _scale_rows_(buf, vdim, inv_temperature)
    return buf, vdim, tanh


def _per_token(values: torch.Tensor, vdim: int) -> torch.Tensor:
    """values [m] shaped to broadcast against the buffer."""
    return values.unsqueeze(vdim)


def _gather(buf: torch.Tensor, vdim: int, labels: torch.Tensor) -> torch.Tensor:
    return buf.gather(vdim, labels.unsqueeze(vdim)).squeeze(vdim)


def _exp_shifted_(buf: torch.Tensor, vdim: int, log_sum_sq_out: torch.Tensor | None = None):
    """Overwrites buf with exp(z - max_v z); returns the per-token max [m] and sum of the exponentials [m]. With
    log_sum_sq_out [m]: also sum_v exp(2 (z - max)) block by block while the block is in cache, written there as
    log sum_v p(v)^2 = log sum exp(2 (z - max)) - 2 log sum exp(z - max)."""
    sum_sq = None if log_sum_sq_out is None else torch.zeros(buf.shape[1 - vdim], dtype=torch.float32,
                                                             device=buf.device)
    if vdim == 1:  # token rows: each block of rows is finished while it is in cache
        row_max = torch.empty(buf.shape[0], dtype=torch.float32, device=buf.device)
        sum_exp = torch.empty_like(row_max)
        for rows in _blocks(buf):
            block = buf[rows]
            torch.amax(block, dim=1, out=row_max[rows])
            block.sub_(row_max[rows, None]).exp_()
            torch.sum(block, dim=1, out=sum_exp[rows])
            if sum_sq is not None:
                sum_sq[rows] = torch.linalg.vecdot(block, block, dim=1)
    else:
        row_max = buf.amax(dim=0)  # vocabulary rows: the max needs a full pass first, then blocks accumulate
        sum_exp = torch.zeros_like(row_max)
        for rows in _blocks(buf):
            block = buf[rows]
            block.sub_(row_max).exp_()
            sum_exp.add_(block.sum(dim=0))
            if sum_sq is not None:
                sum_sq.add_(block.square().sum(dim=0))  # a cached block: faster than vecdot over dim 0
    if sum_sq is not None:
        log_sum_sq_out.copy_(sum_sq.log_().sub_(sum_exp.log().mul_(2.0)))
    return row_max, sum_exp


def _finish_grad_(buf, vdim, labels, coef_target, coef_uniform, tanh, inv_temperature, vocab_size=None):
    """buf holds -(A + B) * softmax; adds A * onehot + B / V and applies the transform's chain rule.
    For a vocabulary tile, labels are tile-local (outside [0, width): no onehot term) and V is `vocab_size`."""
    width = buf.shape[vdim]
    in_tile = (labels >= 0) & (labels < width)
    if bool(in_tile.all()):
        buf.scatter_add_(vdim, labels.unsqueeze(vdim), coef_target.unsqueeze(vdim))
    else:
        src = torch.where(in_tile, coef_target, torch.zeros_like(coef_target))
        buf.scatter_add_(vdim, labels.clamp(0, width - 1).unsqueeze(vdim), src.unsqueeze(vdim))
    if coef_uniform is not None:
        buf.add_(_per_token(coef_uniform / (vocab_size or width), vdim))
    if tanh is not None:
        buf.mul_(tanh.square_().neg_().add_(1.0))  # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2
    _scale_rows_(buf, vdim, inv_temperature)
    return buf if vdim == 1 else buf.t()


def logits_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    inv_temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    with_mean_logp: bool = False,
    log_sum_sq_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-prob of the label, logsumexp and (optionally) the mean log-prob over the vocabulary.

    logits [m, V] (consumed), labels [m] int64 in [0, V).
    Returns logp [m], lse [m], mean_logp [m] or None; all float32.
    On a vocabulary tile with tile-local labels, a label outside the tile contributes a target logit of 0 (and
    log_sum_sq_out gets the tile's own log sum p^2 under the tile's softmax).
    """
    buf, vdim, _ = _transform(logits, inv_temperature, softcap)
    width = buf.shape[vdim]
    in_tile = (labels >= 0) & (labels < width)
    target = _gather(buf, vdim, labels.clamp(0, width - 1))
    if not bool(in_tile.all()):
        target = torch.where(in_tile, target, torch.zeros_like(target))
    mean_z = buf.mean(dim=vdim) if with_mean_logp else None
    row_max, sum_exp = _exp_shifted_(buf, vdim, log_sum_sq_out)
    lse = row_max + sum_exp.log()
    return target - lse, lse, (mean_z - lse if with_mean_logp else None)


def logits_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef_target: torch.Tensor,
    coef_uniform: torch.Tensor | None = None,
    *,
    inv_temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Gradient with respect to the raw logits of  sum_i A_i * logp_i + B_i * mean_logp_i.

    dz = A * onehot(label) + B / V - (A + B) * softmax(z), then through temperature and softcap.
    logits [m, V] is consumed (overwritten when float32); lse, coef_target (A), coef_uniform (B) [m] float32.
    Returns grad_logits [m, V] float32, in the layout of `logits` (may alias it).
    A vocabulary tile [m, Vt] works the same with tile-local labels, the full row's lse and `vocab_size` = V.
    """
    buf, vdim, tanh = _transform(logits, inv_temperature, softcap, keep_tanh=True)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    shift, scale = _per_token(lse, vdim), _per_token(-total, vdim)
    for rows in _blocks(buf):
        if vdim == 1:
            buf[rows].sub_(shift[rows]).exp_().mul_(scale[rows])
        else:
            buf[rows].sub_(shift).exp_().mul_(scale)
    return _finish_grad_(buf, vdim, labels, coef_target, coef_uniform, tanh, inv_temperature, vocab_size)


def logits_forward_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef_fn,
    *,
    inv_temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    with_mean_logp: bool = False,
    log_sum_sq_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward and gradient from one read of the chunk (the in-forward-gradient mode).

    `coef_fn(logp [m], mean_logp [m] | None) -> (coef_target [m], coef_uniform [m] | None)` gives the upstream
    coefficients once the chunk's log-probs are known (log_sum_sq_out is written before it is called). Returns
    logp, lse, mean_logp, grad_logits [m, V] float32.
    """
    buf, vdim, tanh = _transform(logits, inv_temperature, softcap, keep_tanh=True)
    target = _gather(buf, vdim, labels)
    mean_z = buf.mean(dim=vdim) if with_mean_logp else None
    row_max, sum_exp = _exp_shifted_(buf, vdim, log_sum_sq_out)
    lse = row_max + sum_exp.log()
    logp = target - lse
    mean_logp = mean_z - lse if with_mean_logp else None
    coef_target, coef_uniform = coef_fn(logp, mean_logp)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    buf.mul_(_per_token(-total / sum_exp, vdim))
    grad = _finish_grad_(buf, vdim, labels, coef_target, coef_uniform, tanh, inv_temperature)
    return logp, lse, mean_logp, grad


def logits_forward_basis_(logits: torch.Tensor, labels: torch.Tensor, *, inv_temperature: float | torch.Tensor = 1.0,
                          log_sum_sq_out: torch.Tensor | None = None):
    """The frozen-weight forward of a whole-vocabulary chunk (torch backend, float32, no softcap) with one pass
    fewer than logits_forward_grad_: the softmax's normalization moves onto the [m, H] product.

    logits [m, V] (consumed), labels [m] in [0, V). Returns logp [m], lse [m], U [m, V] (in the layout of logits,
    aliasing it) and row_scale [m] such that the gradient of each logp with respect to the raw logits is
    row_scale * U: U = exp(z - max) - S onehot with S = sum exp(z - max), row_scale = -t / S (t: inv_temperature),
    so that row_scale * U = t * (onehot - softmax); t per row when inv_temperature is a tensor [m]."""
    buf, vdim, _ = _transform(logits, inv_temperature, None)
    target = _gather(buf, vdim, labels)
    row_max, sum_exp = _exp_shifted_(buf, vdim, log_sum_sq_out)
    lse = row_max + sum_exp.log()
    buf.scatter_add_(vdim, labels.unsqueeze(vdim), -sum_exp.unsqueeze(vdim))
    return target - lse, lse, (buf if vdim == 1 else buf.t()), sum_exp.reciprocal().mul_(-inv_temperature)


def basis_tile_(logits: torch.Tensor, labels: torch.Tensor, weight_tile: torch.Tensor, run_max: torch.Tensor,
                run_sum: torch.Tensor, acc: torch.Tensor, *, inv_temperature: float | torch.Tensor = 1.0,
                run_sum_sq: torch.Tensor | None = None) -> torch.Tensor:
    """One vocabulary tile of the frozen-weight forward with an online softmax (torch backend, float32/64, no
    softcap), so that a row's basis needs no whole-vocabulary row.

    logits [m, Vt] (the tile's raw logits, consumed), labels [m] tile-local (outside [0, Vt): not in this tile),
    weight_tile [Vt, H]. Updated in place, over the tiles of a row chunk: run_max [m] (start at -inf) and run_sum
    [m] (start at 0), the running max of z = t x and sum of exp(z - run_max); acc [r, H] (r <= m, start at 0),
    sum_v exp(z_v - run_max) w_v of the first r rows (the rows that form a basis; the rest only need their
    log-probs). Returns z at the label where it lies in the tile, else 0. After the last tile: lse = run_max +
    log(run_sum), logp = sum of the returns - lse, basis = t (w_label - acc / run_sum). run_sum_sq [m] (start at
    0), when given: the running sum of exp(2 (z - run_max)), so that log sum_v p(v)^2 = log(run_sum_sq) -
    2 log(run_sum)."""
    buf, vdim, _ = _transform(logits, inv_temperature, None)
    width = buf.shape[vdim]
    in_tile = (labels >= 0) & (labels < width)
    target = torch.where(in_tile, _gather(buf, vdim, labels.clamp(0, width - 1)), torch.zeros_like(run_max))
    new_max = torch.maximum(run_max, buf.amax(dim=vdim))
    scale = (run_max - new_max).exp_()  # 0 at the first tile (run_max = -inf)
    buf.sub_(_per_token(new_max, vdim)).exp_()
    run_sum.mul_(scale).add_(buf.sum(dim=vdim))
    if run_sum_sq is not None:
        run_sum_sq.mul_(scale.square()).add_(torch.linalg.vecdot(buf, buf, dim=vdim))
    rows = acc.shape[0]
    probs = buf if vdim == 1 else buf.t()  # [m, Vt] unnormalized: exp(z - new_max)
    acc.mul_(scale[:rows, None]).addmm_(probs[:rows], weight_tile.to(probs.dtype))
    run_max.copy_(new_max)
    return target


def folded_shift(lse: torch.Tensor, coef_target: torch.Tensor, coef_uniform: torch.Tensor | None,
                 inv_temperature: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift [m], row_scale [m]) of the folded recompute (torch backend, float32/64, no softcap).

    The gradient of sum_i A_i logp_i + B_i mean_logp_i with respect to the raw logits x is
    dx = t * (A onehot + B / V - (A + B) softmax(t x)) with t = inv_temperature. With s = -sign(A + B) (1 where
    A + B = 0) it is dx = (t s) * U, U = exp(t x - lse + log|A + B|) + s A onehot + s B / V: the shift
    `log|A + B| - lse` goes into the logits matmul (addmm's input), the per-row factor `row_scale = t s` into the
    small operands of the gradient matmuls, so the only pass over the chunk is exp_ (see `folded_grad_`)."""
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    shift = total.abs().log_().sub_(lse)  # -inf where total == 0: exp gives 0, the row's softmax term vanishes
    sign = torch.where(total > 0, -1.0, 1.0).to(lse.dtype)
    return shift, sign.mul_(inv_temperature)


def folded_grad_(buf: torch.Tensor, labels: torch.Tensor, coef_target: torch.Tensor,
                 coef_uniform: torch.Tensor | None, row_scale: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """buf [Vt, m] (a vocabulary tile of columns) holds t x - lse + log|A + B| (`folded_shift`); overwritten with
    U = exp(buf) + s A onehot + s B / V, so that dx = row_scale * U (row_scale = t s per column). labels are
    tile-local (outside [0, Vt): no onehot term); V is the whole vocabulary."""
    buf.exp_()
    sign = row_scale.sign()
    width = buf.shape[0]
    in_tile = (labels >= 0) & (labels < width)
    src = coef_target * sign
    if not bool(in_tile.all()):
        src = torch.where(in_tile, src, torch.zeros_like(src))
    buf.scatter_add_(0, labels.clamp(0, width - 1).unsqueeze(0), src.unsqueeze(0).to(buf.dtype))
    if coef_uniform is not None:
        buf.add_((coef_uniform * sign / vocab_size).to(buf.dtype).unsqueeze(0))
    return buf


@torch.no_grad()
def logits_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    inv_temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    top_k: int = 10,
) -> dict[str, torch.Tensor]:
    """Monitoring statistics per row of logits [m, V]; see `prefuse.kernels.stats.TokenStats` for the fields.
    Reads `logits` without changing it (the same chunk may go on to the log-prob pass)."""
    z = logits.contiguous().float()
    if z.data_ptr() == logits.data_ptr():
        z = z.clone()
    z, _, _ = _transform(z, inv_temperature, softcap)
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z.sub_(lse[:, None])  # log-softmax, in place
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    # log sum_v p(v)^2 = logsumexp(2 z) - 2 logsumexp(z) = logsumexp(2 log p): every term <= 1, no overflow
    log_sum_sq = torch.logsumexp(2.0 * logp_all, dim=-1)
    k = min(top_k, logits.shape[1])
    top_logp = logp_all.topk(k, dim=-1).values
    top_p = top_logp.exp()
    mass = top_p.sum(dim=-1)
    plogp = (top_p * top_logp).sum(dim=-1)
    out = {
        "logsumexp": lse,
        "entropy": entropy,
        "log_sum_sq_probs": log_sum_sq,
        "topk_mass": mass,
        "topk_entropy": mass.log() - plogp / mass,
        "topk_entropy_unnormalized": -plogp,
    }
    if labels is not None:
        out["logprobs"] = logp_all.gather(1, labels[:, None]).squeeze(1)
        out["label_is_argmax"] = logp_all.argmax(dim=-1) == labels
    return out


__all__ = ["logits_forward", "logits_grad_", "logits_forward_grad_", "logits_stats", "folded_shift", "folded_grad_",
           "logits_forward_basis_"]
