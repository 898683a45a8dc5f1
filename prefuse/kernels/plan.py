"""Chunk size and mode from a memory budget.

Per chunk of m rows the head holds one logits buffer [m, V] in the compute dtype, reused by every chunk; float32
chunks are worked on in place, bf16/fp16 chunks add a float32 working copy: V * itemsize (+ 4 * V) bytes per row.
The default budget (96 MiB) was picked on the CPU at N=4096, H=1024, V=32000 fp32 (bench/): 784 rows per chunk is
where the matmuls reach their full speed; larger chunks only add memory. The in-forward
gradient mode also holds grad_hidden [M, H] and a float32 grad_weight [V, H] from forward to backward; it is taken
when the upstream gradient is known in forward and those buffers fit in `grad_budget_bytes`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MiB = 1 << 20
DEFAULT_CHUNK_BUDGET_BYTES = 96 * MiB
CPU_GRAD_BUDGET_BYTES = 4096 * MiB
MODES = ("auto", "recompute", "in_forward")


@dataclass(frozen=True)
class Plan:
    rows_per_chunk: int
    mode: str  # "recompute" | "in_forward" | "forward_only"


def rows_for_budget(vocab: int, itemsize: int, chunk_budget_bytes: int) -> int:
    """Rows per chunk so that one chunk's logits and its float32 working copy fit the budget (multiple of 8)."""
    per_row = vocab * (itemsize + (0 if itemsize == 4 else 4))
    rows = max(1, chunk_budget_bytes // per_row)
    return rows if rows < 8 else rows - rows % 8


def default_grad_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    return CPU_GRAD_BUDGET_BYTES


def make_plan(
    *,
    n_rows: int,
    hidden_size: int,
    vocab: int,
    dtype: torch.dtype,
    device: torch.device,
    needs_grad: bool,
    upstream_known: bool,
    mode: str = "auto",
    chunk_size: int | None = None,
    chunk_budget_bytes: int | None = None,
    grad_budget_bytes: int | None = None,
) -> Plan:
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = chunk_size or rows_for_budget(vocab, itemsize, chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES)
    rows = max(1, min(rows, max(n_rows, 1)))
    if not needs_grad:
        return Plan(rows, "forward_only")
    if mode == "recompute" or not upstream_known:
        return Plan(rows, "recompute")
    if mode == "in_forward":
        return Plan(rows, "in_forward")
    held = n_rows * hidden_size * itemsize + vocab * hidden_size * 4
    budget = default_grad_budget(device) if grad_budget_bytes is None else grad_budget_bytes
    return Plan(rows, "in_forward" if held <= budget else "recompute")
