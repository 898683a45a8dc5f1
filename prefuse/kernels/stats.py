"""Per-token statistics of the head's distribution, for monitoring (no gradient), from one chunked pass.

The top-k indicators follow docs/methods/monitor.md (k, renormalization and aggregation are the project's
choices there, marked unverified against the paper): with p = softmax(z) and S the k most probable tokens,
topk_mass = sum_S p, topk_entropy = entropy of p restricted to S and renormalized, topk_entropy_unnormalized =
-sum_S p log p.

`extra_top_k` adds topk_mass and topk_entropy for other k from the same pass: each chunk's logits are computed
once (the matmul, the pass's main cost) and the statistics kernel reads them once per k (it keeps one running
top-k per launch).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from prefuse.kernels.fused_head import chunk_logits, chunk_slices
from prefuse.kernels.low_rank import LowRank, add_low_rank_, check_low_rank
from prefuse.kernels.plan import DEFAULT_CHUNK_BUDGET_BYTES, rows_for_budget
from prefuse.kernels.rows import LabeledRows, gather_rows, select_labeled_rows
from prefuse.kernels.validate import check_head_inputs, check_transform, resolve_backend


@dataclass
class TokenStats:
    """Each field is [...] like labels (float32 unless noted); positions with an ignored label hold 0 / False.

    mask: bool, which positions were computed. logsumexp, entropy (nats), log_sum_sq_probs (log sum_v p(v)^2, the
    WPO weight's per-token term: logsumexp(2 z) - 2 logsumexp(z), from the same pass), topk_mass, topk_entropy,
    topk_entropy_unnormalized. With labels: logprobs (of the label) and label_is_argmax (bool; the label is the
    first index of the maximum, as torch.argmax breaks ties); None without labels. extra_topk: with `extra_top_k`,
    "topk_mass@k" and "topk_entropy@k" for each of those k (same shape and fill).
    """

    mask: torch.Tensor
    logsumexp: torch.Tensor
    entropy: torch.Tensor
    log_sum_sq_probs: torch.Tensor
    topk_mass: torch.Tensor
    topk_entropy: torch.Tensor
    topk_entropy_unnormalized: torch.Tensor
    logprobs: torch.Tensor | None = None
    label_is_argmax: torch.Tensor | None = None
    extra_topk: dict[str, torch.Tensor] = field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        """Mean of each statistic (extra_topk's included, under their names) over the computed positions (0.0 when
        there are none)."""
        n = int(self.mask.sum())
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("mask", "extra_topk")}
        values.update(self.extra_topk)
        return {name: float(value[self.mask].float().sum() / n) if n else 0.0
                for name, value in values.items() if value is not None}


@torch.no_grad()
def linear_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float | torch.Tensor = 1.0,
    softcap: float | None = None,
    top_k: int = 10,
    extra_top_k: Sequence[int] = (),
    backend: str = "auto",
    chunk_size: int | None = None,
    chunk_budget_bytes: int | None = None,
    block_v: int | None = None,
    low_rank: LowRank | None = None,
) -> TokenStats:
    """Statistics of softmax(transform(hidden @ weight.T + bias)) at every position (or every labeled one).

    hidden [..., H], weight [V, H], labels [...] or None. top_k > V is clamped to V (so is each extra_top_k: the
    top-k statistics of further k, in TokenStats.extra_topk, from the same chunks of logits). temperature: a float
    or one value per row (a tensor whose shape is a leading part of hidden's leading shape), as in
    `linear_logprobs`. low_rank: (u [..., r], factor [V, r]) adds u @ factor.T to the logits (LoRA on the lm_head,
    as in `linear_logprobs`).
    """
    check_head_inputs(hidden, weight, labels, bias, ignore_index=ignore_index)
    if low_rank is not None:
        check_low_rank(hidden, weight, low_rank)
    check_transform(temperature, softcap, hidden.shape[:-1])
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k: must be a positive integer, got {top_k!r}")
    extra_top_k = tuple(extra_top_k)
    if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in extra_top_k):
        raise ValueError(f"extra_top_k: must be positive integers, got {list(extra_top_k)!r}")
    backend = resolve_backend(backend, hidden.device)
    rows = select_labeled_rows(hidden, labels, ignore_index, temperature)
    itemsize = hidden.element_size()
    rows_per_chunk = chunk_size or rows_for_budget(weight.shape[0], itemsize,
                                                   chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES)
    if backend == "triton":
        from prefuse.kernels import triton_ops as ops
        extra = {"block_v": block_v} if block_v is not None else {}
    else:
        from prefuse.kernels import torch_ops as ops
        extra = {}
    chunks = []
    for sl in chunk_slices(rows.n_rows, rows_per_chunk):
        logits = chunk_logits(gather_rows(rows.hidden, rows.index, sl), weight, bias)
        if low_rank is not None:
            add_low_rank_(logits, gather_rows(low_rank[0].reshape(-1, low_rank[0].shape[-1]), rows.index, sl),
                          low_rank[1])
        inv_t = rows.inv_temperature[sl] if isinstance(rows.inv_temperature, torch.Tensor) else rows.inv_temperature
        stats = ops.logits_stats(logits, None if rows.labels is None else rows.labels[sl],
                                 inv_temperature=inv_t, softcap=softcap, top_k=top_k, **extra)
        for k in extra_top_k:  # the same logits, read again for another k (the kernels do not change them)
            more = ops.logits_stats(logits, None, inv_temperature=inv_t, softcap=softcap, top_k=k, **extra)
            stats.update({f"{name}@{k}": more[name] for name in EXTRA_TOPK_STATISTICS})
        chunks.append(stats)
    return assemble_stats(chunks, rows, with_labels=labels is not None, extra_top_k=extra_top_k)


# what extra_top_k adds for each of its k: "<name>@<k>"
EXTRA_TOPK_STATISTICS = ("topk_mass", "topk_entropy")


def assemble_stats(chunks: list[dict[str, torch.Tensor]], rows: LabeledRows, with_labels: bool,
                   extra_top_k: Sequence[int] = ()) -> TokenStats:
    """Per-chunk statistics of the kept rows (in order) -> TokenStats shaped like the caller's labels."""
    names = ["logsumexp", "entropy", "log_sum_sq_probs", "topk_mass", "topk_entropy", "topk_entropy_unnormalized"]
    if with_labels:
        names += ["logprobs", "label_is_argmax"]
    extra_names = [f"{name}@{k}" for k in extra_top_k for name in EXTRA_TOPK_STATISTICS]
    names += extra_names
    device = rows.hidden.device
    result = {}
    for name in names:
        dtype = torch.bool if name == "label_is_argmax" else torch.float32
        flat = torch.cat([c[name] for c in chunks]) if chunks else torch.empty(0, dtype=dtype, device=device)
        result[name] = rows.scatter(flat.to(dtype), fill=False if dtype == torch.bool else 0.0)
    mask = rows.scatter(torch.ones(rows.n_rows, dtype=torch.bool, device=device), fill=False)
    extra_topk = {name: result.pop(name) for name in extra_names}
    return TokenStats(mask=mask, **result, extra_topk=extra_topk)
