"""Packed sequences (padding-free): a right-padded batch's sequences laid end to end in rows without padding.

    packed = pack_sequences(input_ids [S, T], attention_mask [S, T])
    hidden = decoder(packed.input_ids [R, L], position_ids=packed.position_ids)     # no attention_mask
    loss = PreferenceLoss(...)(hidden, weight, labels [S, T], hidden_index=packed.hidden_index, roles=...)

Each sequence keeps its own token positions (position ids restart at 0 with every sequence), so a model whose
attention mask follows the position ids (transformers' packed-sequence masks for sdpa and eager, flash-attention's
varlen) attends within each sequence only and gives every token the hidden state it has in the padded batch. The
labels, roles and everything keyed by sequence stay in the padded layout [S, T]; `hidden_index` [S, T] says where
each position's hidden state lies among the R * L packed ones.

By default every sequence goes into one row [1, N] (N: the batch's tokens), no padding at all: what
flash-attention's varlen kernel wants. sdpa and eager compute a row's whole [L, L] score matrix under the mask,
so `row_tokens` caps the rows' width (the padded width T: never more attention work than the padded batch, and
some padding back at the rows' ends). Sequences then go to rows first-fit by decreasing length; a row's unused
tail is a segment of its own (positions restarting at 0, token `pad_id`) that no sequence attends to and no label
reads.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PackedRows", "pack_sequences"]


@dataclass
class PackedRows:
    """input_ids and position_ids [R, L]; hidden_index [S, T]: the position among the R * L of each (sequence,
    token), -1 past the sequence's end; sequence [R, L]: the sequence each packed position holds, -1 on a row's
    unused tail."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    hidden_index: torch.Tensor
    sequence: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Positions the decoder runs: R * L."""
        return int(self.input_ids.numel())

    def to(self, device) -> PackedRows:
        return PackedRows(self.input_ids.to(device), self.position_ids.to(device), self.hidden_index.to(device),
                          self.sequence.to(device))

    def padded(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """values [R, L, ...] in the packed layout -> [S, T, ...] in the padded one, `fill` past each sequence's
        end (differentiable with respect to values)."""
        flat = values.reshape(self.input_ids.numel(), *values.shape[2:])
        index = self.hidden_index.clamp(min=0).reshape(-1)
        out = flat.index_select(0, index).view(*self.hidden_index.shape, *values.shape[2:])
        keep = (self.hidden_index >= 0).view(*self.hidden_index.shape, *([1] * (values.dim() - 2)))
        return torch.where(keep, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))

    def packed(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """values [S, T, ...] in the padded layout -> [R, L, ...] in the packed one, `fill` on rows' tails."""
        out = torch.full((self.input_ids.numel(), *values.shape[2:]), fill, dtype=values.dtype, device=values.device)
        keep = self.hidden_index.reshape(-1) >= 0
        out[self.hidden_index.reshape(-1)[keep]] = values.reshape(-1, *values.shape[2:])[keep]
        return out.view(*self.input_ids.shape, *values.shape[2:])


def _sequence_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """[S]: each row's length; ValueError unless every row is right-padded (its ones, then its zeros)."""
    lengths = attention_mask.long().sum(-1)
    prefix = torch.arange(attention_mask.shape[1], device=attention_mask.device) < lengths[:, None]
    if not bool((prefix == attention_mask.bool()).all()):
        raise ValueError("attention_mask: padding_free packs right-padded rows (ones, then zeros); this batch has "
                         "left padding or holes")
    return lengths


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, *, row_tokens: int | None = None,
                   pad_id: int = 0) -> PackedRows:
    """The sequences of a right-padded batch, input_ids and attention_mask [S, T], packed into rows of at most
    `row_tokens` tokens (default: all in one row), first-fit by decreasing length (module docstring)."""
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids, attention_mask: expected the same [S, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    n_seq, width = input_ids.shape
    lengths = _sequence_lengths(attention_mask).tolist()
    row_tokens = max(sum(lengths), 1) if row_tokens is None else int(row_tokens)
    if max(lengths, default=0) > row_tokens:
        raise ValueError(f"row_tokens: {row_tokens} is shorter than the longest sequence ({max(lengths)} tokens); "
                         f"raise it")
    rows: list[list[int]] = []     # the sequences of each row, in the order they sit
    room: list[int] = []           # each row's free tokens
    for s in sorted(range(n_seq), key=lambda s: -lengths[s]):   # stable: equal lengths keep their order
        row = next((r for r, free in enumerate(room) if free >= lengths[s]), None)
        if row is None:
            rows.append([])
            room.append(row_tokens)
            row = len(rows) - 1
        rows[row].append(s)
        room[row] -= lengths[s]
    n_rows = max(len(rows), 1)
    row_width = max((row_tokens - free for free in room), default=1) or 1
    packed_ids = torch.full((n_rows, row_width), pad_id, dtype=input_ids.dtype)
    position_ids = torch.zeros((n_rows, row_width), dtype=torch.long)
    sequence = torch.full((n_rows, row_width), -1, dtype=torch.long)
    hidden_index = torch.full((n_seq, width), -1, dtype=torch.long)
    ids = input_ids.cpu()
    for r, members in enumerate(rows):
        start = 0
        for s in members:
            n = lengths[s]
            packed_ids[r, start:start + n] = ids[s, :n]
            position_ids[r, start:start + n] = torch.arange(n)
            sequence[r, start:start + n] = s
            hidden_index[s, :n] = r * row_width + start + torch.arange(n)
            start += n
        position_ids[r, start:] = torch.arange(row_width - start)  # the tail: a segment of its own
    device = input_ids.device
    return PackedRows(packed_ids.to(device), position_ids.to(device), hidden_index.to(device), sequence.to(device))
