"""The matmul floor of a step: how long its matmuls alone would take on this machine.

A path's matmul FLOPs come from one profiled step (`torch.profiler` with recorded shapes, so compiled peers
count too: their products run as aten matmuls): 2*m*k*n per mm/addmm/addmm_ (b times that for bmm/baddbmm);
matmul, linear and einsum reach these ops, which call no other of them. Kernels that fuse their matmuls
(cut-cross-entropy's Triton kernel) count 0 and get no floor. The rate is the faster of two plain
products of hidden [M, H] x weight.T [H, V] (M the labeled rows): one whole product (its output capped at 2^27
elements) and the same in cache-sized tiles, timed in the same process, taking turns with the paths. floor = FLOPs / rate: a path at 1.0x its floor spends all its time in
matmuls running as fast as a plain product does; a path whose floor exceeds another's measured time cannot
catch it by removing anything but matmuls.
"""
from __future__ import annotations

import torch

# aten ops whose FLOPs are counted from their operands' shapes: (index of the first matrix operand, batched)
MATMUL_OPS = {"aten::mm": (0, False), "aten::addmm": (1, False), "aten::addmm_": (1, False),
              "aten::bmm": (0, True), "aten::baddbmm": (1, True), "aten::baddbmm_": (1, True)}
MAX_PRODUCT_ELEMENTS = 1 << 27
TILE = (512, 1024)


def _event_flops(name: str, shapes: list) -> float:
    first, batched = MATMUL_OPS[name]
    a, b = shapes[first], shapes[first + 1]
    if batched:
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 2.0 * a[0] * a[1] * b[1]


def count_matmul_flops(step) -> float:
    """FLOPs of the matmuls that one call of step() runs (profiled; the call's result is discarded)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        step()
    return sum(_event_flops(e.name, e.input_shapes) for e in prof.events()
               if e.name in MATMUL_OPS and e.input_shapes)


def product_flops(m: int, h: int, v: int) -> float:
    """FLOPs of one [m, H] x [H, V] product, the unit of the tables' "matmul products" column."""
    return 2.0 * m * h * v


def reference_products(hidden: torch.Tensor, weight: torch.Tensor, m: int) -> dict:
    """{name: (step, flops)}: plain products of m rows of hidden [..., H] with weight [V, H]^T into preallocated
    outputs, the rates a floor is measured against (the faster one counts): "whole", one product (columns capped
    so that the output stays below MAX_PRODUCT_ELEMENTS), and "tiles", the same product as [512, H] x [H, 1024]
    tiles into one buffer (cache-sized outputs, which run faster than the whole one on a CPU)."""
    h = hidden.shape[-1]
    flat = hidden.detach().reshape(-1, h)  # [N, H]: a preference task's hidden is [2B, T, H]
    rows = max(1, min(m, flat.shape[0]))
    cols = max(1, min(weight.shape[0], MAX_PRODUCT_ELEMENTS // rows))
    a = flat[:rows].contiguous()
    b = weight.detach()[:cols].t()
    whole = torch.empty(rows, cols, dtype=hidden.dtype, device=hidden.device)
    tile_rows, tile_cols = min(TILE[0], rows), min(TILE[1], cols)
    tile = torch.empty(tile_rows, tile_cols, dtype=hidden.dtype, device=hidden.device)
    row_starts = range(0, rows - tile_rows + 1, tile_rows)
    col_starts = range(0, cols - tile_cols + 1, tile_cols)

    def whole_step():
        torch.mm(a, b, out=whole)

    def tiles_step():
        for r in row_starts:
            for c in col_starts:
                torch.mm(a[r:r + tile_rows], b[:, c:c + tile_cols], out=tile)
    tiled = product_flops(tile_rows, h, tile_cols) * len(row_starts) * len(col_starts)
    return {"whole": (whole_step, product_flops(rows, h, cols)), "tiles": (tiles_step, tiled)}
