"""The data-parallel gather of an objective's inputs: each rank holds a share of the batch's examples, and an
objective coupled across examples (not separable) sees the whole batch.

    inputs = gather_examples(inputs, n_examples, group)   # every [B, ...] tensor all-gathered along B, with autograd

`PreferenceLoss` calls it when its `batch_group` is set (engine/train/distributed.py sets it under data parallelism).
"""
from __future__ import annotations

import torch


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
