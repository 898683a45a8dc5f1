"""Dropping ignored rows before the matmul, and putting per-row results back in place."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LabeledRows:
    """The rows of hidden that carry a label, without copying them: hidden [N, H] (the caller's rows, flattened),
    labels [M] int64 of the kept rows, index [M] of the kept rows among the N (None when every row is kept),
    inv_temperature: 1 / temperature, a float or float32 [M] (the kept rows' own, dropped with their rows).
    The head gathers each chunk's rows itself, so no [M, H] copy is held from forward to backward."""

    hidden: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor | None
    n_total: int
    shape: torch.Size  # leading shape of the caller's hidden / labels
    inv_temperature: float | torch.Tensor = 1.0

    @property
    def n_rows(self) -> int:
        return self.n_total if self.index is None else self.index.shape[0]

    def scatter(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """values [M] -> [*shape], `fill` at ignored positions; differentiable with respect to values."""
        if self.index is None:
            return values.reshape(self.shape)
        full = torch.full((self.n_total,), fill, dtype=values.dtype, device=values.device)
        return full.index_copy(0, self.index, values).reshape(self.shape)


def inv_temperature_per_position(temperature: float | torch.Tensor, shape, device) -> float | torch.Tensor:
    """1 / temperature: a float stays a float; a tensor whose shape is a leading part of `shape` (checked by
    validate.check_transform) becomes float32 [prod(shape)], one value per position of the flattened shape."""
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / temperature
    shape = tuple(shape)
    t = temperature.detach().to(device=device, dtype=torch.float32)
    t = t.reshape(tuple(t.shape) + (1,) * (len(shape) - t.dim()))
    return t.expand(shape).reshape(-1).reciprocal()


def select_labeled_rows(hidden: torch.Tensor, labels: torch.Tensor | None, ignore_index: int,
                        temperature: float | torch.Tensor = 1.0) -> LabeledRows:
    """hidden [..., H], labels [...] -> the rows whose label is not ignore_index (all rows when labels is None).
    temperature: a float, or a tensor of one value per row (shape a leading part of labels'); the dropped rows'
    values are dropped with them."""
    shape = hidden.shape[:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    inv_t = inv_temperature_per_position(temperature, shape, hidden.device)
    if labels is None:
        return LabeledRows(flat, None, None, flat.shape[0], shape, inv_t)
    flat_labels = labels.reshape(-1).long()
    keep = flat_labels != ignore_index
    if bool(keep.all()):
        return LabeledRows(flat, flat_labels.contiguous(), None, flat.shape[0], shape, inv_t)
    index = keep.nonzero().squeeze(1)
    if isinstance(inv_t, torch.Tensor):
        inv_t = inv_t.index_select(0, index)
    return LabeledRows(flat, flat_labels.index_select(0, index), index, flat.shape[0], shape, inv_t)


def gather_rows(hidden: torch.Tensor, index: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """hidden [N, H] -> the chunk `rows` of the kept rows [m, H] (a view when every row is kept)."""
    return hidden[rows] if index is None else hidden.index_select(0, index[rows])


def zero_connected(*tensors: torch.Tensor | None) -> torch.Tensor:
    """A 0-d zero that is connected to `tensors` in the graph (zero gradients, never NaN even for inf inputs)."""
    out = None
    for t in tensors:
        if t is not None and t.requires_grad:
            term = t.flatten()[:0].sum()
            out = term if out is None else out + term
    if out is None:
        ref = next(t for t in tensors if t is not None)
        return torch.zeros((), dtype=torch.float32, device=ref.device)
    return out.float()
