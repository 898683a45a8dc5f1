"""The float64 reference of the fused head, written plainly: full logits, log_softmax, gather. Tests only."""
from __future__ import annotations

import torch


def logits64(hidden, weight, bias=None, temperature=1.0, softcap=None):
    """[..., V] float64 logits after the transform (softcap, then temperature)."""
    x = hidden.double() @ weight.double().t()
    if bias is not None:
        x = x + bias.double()
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    return x / temperature


def logprobs64(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, softcap=None):
    """[...] float64 log-prob of labels, 0 where labels == ignore_index."""
    logp = torch.log_softmax(logits64(hidden, weight, bias, temperature, softcap), dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


def cross_entropy64(hidden, weight, labels, bias=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                    temperature=1.0, softcap=None):
    """-(1 - eps) log p[label] - eps * mean_v log p[v] per kept token; mean over kept tokens, sum, or none."""
    logp = torch.log_softmax(logits64(hidden, weight, bias, temperature, softcap), dim=-1)
    keep = labels != ignore_index
    picked = logp.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    token = -(1 - label_smoothing) * picked - label_smoothing * logp.mean(dim=-1)
    token = torch.where(keep, token, torch.zeros_like(token))
    if reduction == "none":
        return token
    if reduction == "sum":
        return token.sum()
    return token.sum() / keep.sum()


def token_stats64(hidden, weight, labels=None, bias=None, temperature=1.0, softcap=None, top_k=10):
    """dict of float64 [...] statistics at every position."""
    logp = torch.log_softmax(logits64(hidden, weight, bias, temperature, softcap), dim=-1)
    p = logp.exp()
    k = min(top_k, logp.shape[-1])
    top_logp = logp.topk(k, dim=-1).values
    top_p = top_logp.exp()
    mass = top_p.sum(-1)
    q = top_p / mass.unsqueeze(-1)
    out = {
        "logsumexp": torch.logsumexp(logits64(hidden, weight, bias, temperature, softcap), dim=-1),
        "entropy": -(p * logp).sum(-1),
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
        "topk_mass": mass,
        "topk_entropy": -(q * q.log()).sum(-1),
        "topk_entropy_unnormalized": -(top_p * top_logp).sum(-1),
    }
    if labels is not None:
        out["logprobs"] = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out["label_is_argmax"] = logp.argmax(-1) == labels
    return out


def grads(output, inputs, seed=0):
    """Gradients of sum(output * r) for a fixed random r, with respect to each input (None when unused)."""
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(output.shape, generator=gen, dtype=torch.float64).to(output.dtype)
    return torch.autograd.grad((output * r).sum(), inputs, allow_unused=True)


def make_inputs(n, h, v, dtype=torch.float32, *, bias=False, ignore_frac=0.25, lead=None, seed=0, scale=1.0):
    """hidden [*lead or n, h], weight [v, h], labels, bias; leaves requiring grad, scaled so logits are O(scale)."""
    gen = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (n,)
    hidden = (torch.randn(*shape, h, generator=gen, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) / h ** 0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < ignore_frac
    labels[drop] = -100
    return hidden, weight, labels, b
