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
