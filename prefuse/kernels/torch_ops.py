"""Chunk operations on a block of raw logits, in plain torch.

Every function here has a Triton twin in `triton_ops` with the same signature; `fused_head` picks one.
A chunk is `logits [m, V]`: the matmul output `hidden_chunk @ weight.T (+ bias)` in the compute dtype. It is the
driver's scratch buffer: these functions may overwrite it (float32 chunks are transformed in place, which keeps the
peak at one chunk). Work is done in float32 whatever the compute dtype.

The logit transform, applied in this order (Gemma-2 caps the logits before any sampling temperature):
    z = softcap * tanh(x / softcap)   (when softcap is given)
    z = z / temperature
"""
from __future__ import annotations

import torch


# Row blocks of about this many bytes stay in a core's L2 cache across the several elementwise passes of a softmax.
ROW_BLOCK_BYTES = 1 << 20


def _row_blocks(n_rows: int, vocab: int) -> list[slice]:
    step = max(1, ROW_BLOCK_BYTES // (4 * vocab))
    return [slice(s, min(s + step, n_rows)) for s in range(0, n_rows, step)]


def _transform(logits: torch.Tensor, inv_temperature: float, softcap: float | None, keep_tanh: bool = False):
    """z [m, V] float32 (the input itself when float32, transformed in place), and tanh(x / softcap) when capped
    and `keep_tanh` (the backward's chain rule needs it)."""
    z = logits.float()
    tanh = None
    if softcap is not None:
        z.div_(softcap).tanh_()
        tanh = z.clone() if keep_tanh else None
        z.mul_(softcap)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z, tanh


def _exp_shifted_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Overwrites z [m, V] with exp(z - rowmax); returns rowmax [m] and the row sums of the exponentials [m]."""
    row_max = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    sum_exp = torch.empty_like(row_max)
    for rows in _row_blocks(z.shape[0], z.shape[1]):
        block = z[rows]
        torch.amax(block, dim=-1, out=row_max[rows])
        block.sub_(row_max[rows, None]).exp_()
        torch.sum(block, dim=-1, out=sum_exp[rows])
    return row_max, sum_exp


def _finish_grad_(grad, labels, coef_target, coef_uniform, tanh, inv_temperature):
    """grad holds -(A + B) * softmax; adds A * onehot + B / V and applies the transform's chain rule."""
    grad.scatter_add_(1, labels[:, None], coef_target[:, None])
    if coef_uniform is not None:
        grad.add_((coef_uniform / grad.shape[1])[:, None])
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))  # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad


def logits_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    inv_temperature: float = 1.0,
    softcap: float | None = None,
    with_mean_logp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-prob of the label, logsumexp and (optionally) the mean log-prob over the vocabulary.

    logits [m, V] (consumed), labels [m] int64 in [0, V).
    Returns logp [m], lse [m], mean_logp [m] or None; all float32.
    """
    z, _ = _transform(logits, inv_temperature, softcap)
    target = z.gather(1, labels[:, None]).squeeze(1)
    mean_z = z.mean(dim=-1) if with_mean_logp else None
    row_max, sum_exp = _exp_shifted_(z)
    lse = row_max + sum_exp.log()
    return target - lse, lse, (mean_z - lse if with_mean_logp else None)


def logits_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    coef_target: torch.Tensor,
    coef_uniform: torch.Tensor | None = None,
    *,
    inv_temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Gradient with respect to the raw logits of  sum_i A_i * logp_i + B_i * mean_logp_i.

    dz = A * onehot(label) + B / V - (A + B) * softmax(z), then through temperature and softcap.
    logits [m, V] is consumed (overwritten when float32); lse, coef_target (A), coef_uniform (B) [m] float32.
    Returns grad_logits [m, V] float32 (may alias `logits`).
    """
    z, tanh = _transform(logits, inv_temperature, softcap, keep_tanh=True)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    for rows in _row_blocks(z.shape[0], z.shape[1]):
        z[rows].sub_(lse[rows, None]).exp_().mul_(-total[rows, None])
    return _finish_grad_(z, labels, coef_target, coef_uniform, tanh, inv_temperature)


def logits_forward_grad_(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coef_fn,
    *,
    inv_temperature: float = 1.0,
    softcap: float | None = None,
    with_mean_logp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Forward and gradient from one read of the chunk (the in-forward-gradient mode).

    `coef_fn(logp [m], mean_logp [m] | None) -> (coef_target [m], coef_uniform [m] | None)` gives the upstream
    coefficients once the chunk's log-probs are known. Returns logp, lse, mean_logp, grad_logits [m, V] float32.
    """
    z, tanh = _transform(logits, inv_temperature, softcap, keep_tanh=True)
    target = z.gather(1, labels[:, None]).squeeze(1)
    mean_z = z.mean(dim=-1) if with_mean_logp else None
    row_max, sum_exp = _exp_shifted_(z)
    lse = row_max + sum_exp.log()
    logp = target - lse
    mean_logp = mean_z - lse if with_mean_logp else None
    coef_target, coef_uniform = coef_fn(logp, mean_logp)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    grad = z.mul_((-total / sum_exp)[:, None])
    return logp, lse, mean_logp, _finish_grad_(grad, labels, coef_target, coef_uniform, tanh, inv_temperature)


@torch.no_grad()
def logits_stats(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    inv_temperature: float = 1.0,
    softcap: float | None = None,
    top_k: int = 10,
) -> dict[str, torch.Tensor]:
    """Monitoring statistics per row of logits [m, V]; see `prefuse.kernels.stats.TokenStats` for the fields."""
    z, _ = _transform(logits, inv_temperature, softcap)
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z.sub_(lse[:, None])  # log-softmax, in place
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    k = min(top_k, logits.shape[1])
    top_logp = logp_all.topk(k, dim=-1).values
    top_p = top_logp.exp()
    mass = top_p.sum(dim=-1)
    plogp = (top_p * top_logp).sum(dim=-1)
    out = {
        "logsumexp": lse,
        "entropy": entropy,
        "topk_mass": mass,
        "topk_entropy": mass.log() - plogp / mass,
        "topk_entropy_unnormalized": -plogp,
    }
    if labels is not None:
        out["logprobs"] = logp_all.gather(1, labels[:, None]).squeeze(1)
        out["label_is_argmax"] = logp_all.argmax(dim=-1) == labels
    return out


__all__ = ["logits_forward", "logits_grad_", "logits_forward_grad_", "logits_stats"]
