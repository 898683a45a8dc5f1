"""Tokenized examples -> right-padded tensors, with next-token labels as `PreferenceLoss` and the fused head take
them: `labels[:, t]` is the token at `t + 1` when that token belongs to the completion (the hidden state at t
predicts it), IGNORE_INDEX (-100) on the positions that predict prompt tokens, on padding and at the last position.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100


def labeled_tokens(n_prompt: int, n_completion: int) -> int:
    """How many labels `_pad_sequences` sets for a prompt + completion: every completion token, except after an
    empty prompt the first one (no position before it predicts it). Zero means the example teaches nothing."""
    return max(n_completion - (n_prompt == 0), 0)


def _pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_token_id: int,
                   pad_to_multiple_of: int | None) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, labels [N, T] for N sequences prompt + completion."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        n_prompt, n_total = len(prompt), len(prompt) + len(completion)
        input_ids[row, :n_total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[row, :n_total] = 1
        # the token at t + 1 is a completion token for t in [n_prompt - 1, n_total - 1); with an empty prompt the
        # first completion token has no position before it to predict it
        first = max(n_prompt - 1, 0)
        labels[row, first:n_total - 1] = input_ids[row, first + 1:n_total]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_pairs(examples: Sequence[dict[str, Any]], pad_token_id: int,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B paired examples -> `input_ids`, `attention_mask`, `labels` [2B, T]: rows 0..B-1 are prompt + chosen,
    rows B..2B-1 prompt + rejected of the same pairs, right-padded with `pad_token_id` to the longest row (rounded
    up to `pad_to_multiple_of`)."""
    if not examples:
        raise ValueError("collate_pairs needs at least one example")
    prompts = [e["prompt_ids"] for e in examples] * 2
    completions = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
    return _pad_sequences(prompts, completions, pad_token_id, pad_to_multiple_of)


def collate_unpaired(examples: Sequence[dict[str, Any]], pad_token_id: int,
                     pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """B unpaired examples -> `input_ids`, `attention_mask`, `labels` [B, T] (prompt + completion, right-padded)
    and `desirable` [B] bool (the examples' labels)."""
    if not examples:
        raise ValueError("collate_unpaired needs at least one example")
    batch = _pad_sequences([e["prompt_ids"] for e in examples], [e["completion_ids"] for e in examples],
                           pad_token_id, pad_to_multiple_of)
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    return batch


def collate_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]], pad_token_id: int,
                      pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """N (prompt, response) token lists -> `input_ids`, `attention_mask`, `labels` [N, T], right-padded; the
    sequences of any roles, in the order given."""
    if not prompts:
        raise ValueError("collate_sequences needs at least one sequence")
    return _pad_sequences(list(prompts), list(responses), pad_token_id, pad_to_multiple_of)
