"""Chunk size and mode from a memory budget.

Per chunk of m rows the head holds one logits buffer [m, V] in the compute dtype, reused by every chunk; float32
chunks are worked on in place, bf16/fp16 chunks add a float32 working copy: V * itemsize (+ 4 * V) bytes per row.
The in-forward mode needs whole-vocabulary rows: its default budget (96 MiB) was picked on the CPU at N=4096,
H=1024, V=32000 fp32 (bench/), where 784 rows per chunk reach the matmuls' full speed. The recompute and
forward-only paths tile the vocabulary (512 rows x budget-sized tiles), so their default is small: 2 MiB on the
CPU (512 x 1024 float32 tiles, measured as fast as 4 and 8 MiB at N=4096, H=1024, V=32000 in interleaved steps,
and what keeps the head's extra memory at PyTorch's chunked op's), 8 MiB elsewhere. The in-forward
gradient mode also holds grad_hidden [M, H] and a float32 grad_weight [V, H] from forward to backward; it is taken
when the upstream gradient is known in forward and those buffers fit in `grad_budget_bytes`.
The frozen-weight mode (hidden needs a gradient, weight and bias do not) forms each row's gradient basis in forward
and holds it [N, H] in hidden's dtype, the size of the grad_hidden every path returns. On the CPU in float32 it
tiles the vocabulary like the recompute path (the torch backend's online softmax of the basis); elsewhere it takes
whole-vocabulary rows (a row's softmax is complete only after its whole vocabulary) under its own budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MiB = 1 << 20
DEFAULT_CHUNK_BUDGET_BYTES = 96 * MiB  # in-forward mode: whole-vocabulary rows
RECOMPUTE_CHUNK_BUDGET_BYTES = 8 * MiB  # recompute and forward-only: vocabulary tiles keep the matmuls wide
CPU_TILE_BUDGET_BYTES = 2 * MiB  # the same on the CPU, where [512, H] x [H, 1024] products run at full speed
CPU_GRAD_BUDGET_BYTES = 4096 * MiB
# frozen-weight mode: whole-vocabulary rows; 32 MiB (256 rows at V=32000 fp32) measured as fast as 96 MiB on the
# CPU (bench/) at a third of the memory
FROZEN_CHUNK_BUDGET_BYTES = 32 * MiB
MODES = ("auto", "recompute", "in_forward", "frozen_weight")


# When a budget leaves fewer rows than this for whole-vocabulary chunks, the recompute path tiles the vocabulary
# instead of shrinking the rows further: small row counts make the weight-gradient matmul re-read grad_weight
# [V, H] once per chunk, tiles keep the matmuls wide while the buffer stays within the budget.
TILE_ROWS = 512
MIN_VOCAB_TILE = 256


@dataclass(frozen=True)
class Plan:
    rows_per_chunk: int
    mode: str  # "recompute" | "in_forward" | "frozen_weight" | "forward_only"
    vocab_tile: int | None = None  # None: whole-vocabulary chunks (the in-forward mode needs them)


def rows_for_budget(vocab: int, itemsize: int, chunk_budget_bytes: int) -> int:
    """Rows per chunk so that one chunk's logits and its float32 working copy fit the budget (multiple of 8)."""
    per_row = vocab * (itemsize + (0 if itemsize == 4 else 4))
    rows = max(1, chunk_budget_bytes // per_row)
    return rows if rows < 8 else rows - rows % 8


def vocab_tile(n_rows: int, itemsize: int, budget_bytes: int) -> tuple[int, int]:
    """(rows, columns) of a vocabulary tile: up to TILE_ROWS rows, and the columns that fit the budget
    (rows_for_budget over columns, a multiple of MIN_VOCAB_TILE)."""
    rows = min(TILE_ROWS, max(n_rows, 1))
    cols = rows_for_budget(rows, itemsize, budget_bytes)
    return rows, max(MIN_VOCAB_TILE, cols - cols % MIN_VOCAB_TILE)


def tile_budget(device: torch.device) -> int:
    """The default logits buffer of the paths that tile the vocabulary."""
    return CPU_TILE_BUDGET_BYTES if device.type == "cpu" else RECOMPUTE_CHUNK_BUDGET_BYTES


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
    whole_vocab_rows: bool = False,
    weight_frozen: bool = False,
) -> Plan:
    """whole_vocab_rows: never tile the vocabulary (per-token statistics need whole rows). weight_frozen: the
    gradient is wanted for hidden only (weight and bias need none): mode "auto" then takes "frozen_weight" (two
    matmuls per chunk for any objective; the in-forward mode would save no more), "frozen_weight" insists on it."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if mode == "frozen_weight" and needs_grad and not weight_frozen:
        raise ValueError("mode: 'frozen_weight' needs a weight (and bias) that require no gradient and a hidden "
                         "that does; use mode='auto'")
    if needs_grad and weight_frozen and mode in ("auto", "frozen_weight"):
        if chunk_size is None and dtype == torch.float32 and device.type == "cpu":
            # the torch backend's online softmax over vocabulary tiles: 512 rows x budget-sized tiles
            tile_rows, tile = vocab_tile(n_rows, itemsize, chunk_budget_bytes or tile_budget(device))
            if tile < vocab:
                return Plan(tile_rows, "frozen_weight", vocab_tile=tile)
        rows = chunk_size or rows_for_budget(vocab, itemsize, chunk_budget_bytes or FROZEN_CHUNK_BUDGET_BYTES)
        return Plan(max(1, min(rows, max(n_rows, 1))), "frozen_weight")
    chunk_budget = chunk_budget_bytes or DEFAULT_CHUNK_BUDGET_BYTES
    rows = chunk_size or rows_for_budget(vocab, itemsize, chunk_budget)
    rows = max(1, min(rows, max(n_rows, 1)))
    if needs_grad and mode != "recompute" and upstream_known:
        held = n_rows * hidden_size * itemsize + vocab * hidden_size * 4
        budget = default_grad_budget(device) if grad_budget_bytes is None else grad_budget_bytes
        if mode == "in_forward" or held <= budget:
            return Plan(rows, "in_forward")
    kind = "recompute" if needs_grad else "forward_only"
    if whole_vocab_rows:
        return Plan(rows, kind)
    if chunk_budget_bytes is None:
        chunk_budget = tile_budget(device)
        rows = chunk_size or max(1, min(rows_for_budget(vocab, itemsize, chunk_budget), max(n_rows, 1)))
    if chunk_size is None and rows < min(TILE_ROWS, n_rows):
        tile_rows, tile = vocab_tile(n_rows, itemsize, chunk_budget)
        if tile < vocab:
            return Plan(tile_rows, kind, vocab_tile=tile)
    return Plan(rows, kind)
