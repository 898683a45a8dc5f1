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


def _transform(logits: torch.Tensor, inv_temperature: float, softcap: float | None) -> torch.Tensor:
    """z [m, V] float32; a fresh buffer when the input is not float32, else the input itself (modified in place)."""
    z = logits.float()
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


def logits_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    inv_temperature: float = 1.0,
    softcap: float | None = None,
    with_mean_logp: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row log-prob of the label, logsumexp and (optionally) the mean log-prob over the vocabulary.

    logits [m, V] (read only), labels [m] int64 in [0, V).
    Returns logp [m], lse [m], mean_logp [m] or None; all float32.
    """
    z = _transform(logits, inv_temperature, softcap)
    lse = torch.logsumexp(z, dim=-1)
    target = z.gather(1, labels[:, None]).squeeze(1)
    mean_logp = z.mean(dim=-1) - lse if with_mean_logp else None
    return target - lse, lse, mean_logp


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
    vocab = logits.shape[1]
    tanh_sq = None
    z = logits.float()
    if softcap is not None:
        z.div_(softcap).tanh_()
        tanh_sq = z.square()  # d(softcap*tanh(x/softcap))/dx = 1 - tanh^2
        z.mul_(softcap)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    probs = z.sub_(lse[:, None]).exp_()
    grad = probs.mul_(-total[:, None])
    grad.scatter_add_(1, labels[:, None], coef_target[:, None])
    if coef_uniform is not None:
        grad.add_((coef_uniform / vocab)[:, None])
    if tanh_sq is not None:
        grad.mul_(tanh_sq.neg_().add_(1.0))
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return grad


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
    vocab = logits.shape[1]
    z = logits.float()
    tanh = None
    if softcap is not None:
        tanh = z.div_(softcap).tanh_().clone()
        z.mul_(softcap)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    target = z.gather(1, labels[:, None]).squeeze(1)
    mean_z = z.mean(dim=-1) if with_mean_logp else None
    row_max = z.amax(dim=-1)
    exp = z.sub_(row_max[:, None]).exp_()
    sum_exp = exp.sum(dim=-1)
    lse = row_max + sum_exp.log()
    logp = target - lse
    mean_logp = mean_z - lse if with_mean_logp else None
    coef_target, coef_uniform = coef_fn(logp, mean_logp)
    total = coef_target if coef_uniform is None else coef_target + coef_uniform
    grad = exp.mul_((-total / sum_exp)[:, None])
    grad.scatter_add_(1, labels[:, None], coef_target[:, None])
    if coef_uniform is not None:
        grad.add_((coef_uniform / vocab)[:, None])
    if tanh is not None:
        grad.mul_(tanh.square_().neg_().add_(1.0))
    if inv_temperature != 1.0:
        grad.mul_(inv_temperature)
    return logp, lse, mean_logp, grad


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
    z = _transform(logits, inv_temperature, softcap)
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
