"""A preference objective on the vocabulary-parallel head (`prefuse.kernels.vocab_parallel`).

    loss, metrics = vocab_parallel_preference_loss("sigmoid", hidden, weight_shard, labels, vocab_start=start,
                                                   group=group, ref_hidden=ref_hidden, beta=0.1)

hidden [2B, T, H] holds the chosen rows then the rejected rows of B pairs (the layout `PreferenceLoss` defaults to),
labels [2B, T] in the next-token layout, replicated on every rank of `group` like the objective's result; each
rank holds weight_shard [V_r, H]. The sequences' log-prob sums come from the vocabulary-parallel head (forward and
backward combined across the group), the reference's (ref_hidden through the same shard, no gradient) too; the
objective is `prefuse.algorithms.objective_loss` on them.
"""
from __future__ import annotations

import torch

from prefuse.algorithms import objective_loss
from prefuse.kernels.vocab_parallel import vocab_parallel_logprobs


def vocab_parallel_preference_loss(objective, hidden: torch.Tensor, weight_shard: torch.Tensor,
                                   labels: torch.Tensor, *, vocab_start: int, group=None,
                                   ref_hidden: torch.Tensor | None = None, beta: float = 0.1,
                                   ignore_index: int = -100, **objective_args) -> tuple[torch.Tensor, dict]:
    if hidden.shape[0] % 2:
        raise ValueError(f"hidden: expected 2B rows (chosen, then rejected), got {hidden.shape[0]}")
    head = dict(vocab_start=vocab_start, group=group, ignore_index=ignore_index)
    n = hidden.shape[0] // 2
    sums = vocab_parallel_logprobs(hidden, weight_shard, labels, **head).sum(-1)
    inputs = {"policy_chosen_logps": sums[:n], "policy_rejected_logps": sums[n:]}
    if ref_hidden is not None:
        with torch.no_grad():
            ref = vocab_parallel_logprobs(ref_hidden, weight_shard.detach(), labels, **head).sum(-1)
        inputs.update(ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
    return objective_loss(objective, beta=beta, **inputs, **objective_args)


def gather_examples(inputs: dict, n_examples: int, group) -> dict:
    """The whole batch's objective inputs from each rank's share of its examples (ranks in order, shares of
    different sizes allowed): every per-example tensor ([B, ...] with B = n_examples) is all-gathered along its
    first dimension with autograd, whose backward sums every rank's gradient back into the rows of their owner;
    other values stay as they are. Dimensions past the first may differ between ranks (sequences of other
    lengths): they are padded with zeros (a token mask with False) to the longest."""
    from torch.distributed import _functional_collectives as funcol

    names = sorted(k for k, v in inputs.items()
                   if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n_examples)
    ranks = torch.distributed.get_world_size(group)
    device = inputs[names[0]].device if names else torch.device("cpu")
    shapes = [n_examples] + [d for k in names for d in inputs[k].shape[1:]]
    shapes = funcol.wait_tensor(funcol.all_gather_single(torch.tensor(shapes, device=device), 0, group))
    shapes = shapes.view(ranks, -1).tolist()  # per rank: B, then each tensor's trailing dimensions
    sizes = [row[0] for row in shapes]
    out, offset = dict(inputs), 1
    for name in names:
        value = inputs[name]
        trailing = [max(row[offset + d] for row in shapes) for d in range(value.dim() - 1)]
        offset += value.dim() - 1
        boolean = value.dtype == torch.bool
        value = value.to(torch.uint8) if boolean else value  # gloo all-gathers no bool
        pad = [p for d in reversed(range(value.dim())) for p in (0, ([max(sizes)] + trailing)[d] - value.shape[d])]
        padded = torch.nn.functional.pad(value, pad).contiguous()
        whole = funcol.wait_tensor(funcol.all_gather_single(padded, 0, group))
        parts = whole.view(ranks, *padded.shape).unbind(0)
        value = torch.cat([part[:size] for part, size in zip(parts, sizes)])
        out[name] = value.bool() if boolean else value
    return out
