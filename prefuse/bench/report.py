"""Side-by-side runs of the head paths at each shape: extra peak memory from a fresh process per path, time from one
fresh process where the paths take turns; a table and a JSON file come out."""
from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict

import torch

from prefuse.bench.measure import PRODUCT_KEY, Measurement, measure
from prefuse.bench.paths import PATHS

# head and logprobs shapes are (N, H, V); preference shapes (B, T, H, V)
DEFAULT_SHAPES = {
    "head": [(4096, 1024, 32000)],
    "logprobs": [(4096, 1024, 32000)],
    "preference": [(1, 2048, 1024, 32000), (4, 512, 1024, 32000)],
}
# the grid over vocabulary sizes and token counts (`--grid`): Llama-2, Llama-3 and Qwen2 vocabularies
GRID_SHAPES = {
    "head": [(n, 1024, v) for v in (32000, 128256, 151936) for n in (1024, 4096)],
    "logprobs": [(n, 1024, v) for v in (32000, 128256, 151936) for n in (1024, 4096)],
    "preference": [(b, t, 1024, v) for v in (32000, 128256, 151936) for b, t in ((1, 512), (1, 2048))],
}
QUICK_SHAPES = {"head": [(512, 128, 4096)], "logprobs": [(512, 128, 4096)], "preference": [(2, 128, 128, 4096)]}


def available_paths(device: str, task: str = "head") -> list[str]:
    return [name for name, path in PATHS.items() if path.available(device) and path.task == task]


def run(paths: list[str], shapes: list[tuple[int, ...]], *, dtype: str = "float32", device: str = "cpu",
        ignore_frac: float = 0.25, rounds: int = 5, frozen_weight: bool = False, log=print) -> list[dict]:
    """For each shape: the extra peak memory of every path (fresh process each), then the time of every path from
    one fresh process where the paths take turns for `rounds` steps. One record per (shape, path).
    frozen_weight: every path's weight needs no gradient."""
    from prefuse.bench.measure import time_interleaved

    records = []
    for shape in shapes:
        batch = shape[0] if len(shape) == 4 else 1
        n, h, v = (2 * shape[0] * shape[1], *shape[2:]) if len(shape) == 4 else shape
        label = "x".join(map(str, shape))
        memory = {}
        for p in paths:
            m = measure(p, n, h, v, dtype=dtype, device=device, ignore_frac=ignore_frac, repeats=0, batch=batch,
                        frozen_weight=frozen_weight)
            memory[p] = m
            log(f"  {label}  {p:28s} " + (m.error or f"extra peak {m.peak_extra_mib:.0f} MiB"))
        ok = [p for p in paths if not memory[p].error]
        times = time_interleaved(ok, n, h, v, dtype=dtype, device=device, ignore_frac=ignore_frac,
                                 rounds=rounds, batch=batch, frozen_weight=frozen_weight) if ok else {}
        terms = times.get(PRODUCT_KEY)
        if terms:
            rate = max(terms["product_flops_per_s"].values())
            log(f"  {label}  plain products of the {terms['labeled_rows']} labeled rows: " + ", ".join(
                f"{name} {r / 1e9:.0f}" for name, r in terms["product_flops_per_s"].items()) + " GFLOP/s")
        for p in paths:
            rec = {"path": p, "shape": label, "n": n, "h": h, "v": v, "batch": batch, "dtype": dtype,
                   "device": device, "ignore_frac": ignore_frac, "frozen_weight": frozen_weight,
                   "errors": [e for e in (memory[p].error, times.get("error")) if e]}
            if not memory[p].error:
                rec.update(peak_extra_mib=memory[p].peak_extra_mib, loss=memory[p].loss)
            if p in times:
                rec.update(rounds=len(times[p]), time_median_s=statistics.median(times[p]),
                           time_min_s=min(times[p]), time_max_s=max(times[p]))
                log(f"  {label}  {p:28s} median {rec['time_median_s']:.3f} s over {len(times[p])} steps")
            if terms and terms["matmul_flops"].get(p):  # 0: the path's matmuls run outside aten (fused kernels)
                flops = terms["matmul_flops"][p]
                rec.update(labeled_rows=terms["labeled_rows"], matmul_flops=flops,
                           matmul_products=flops / terms["unit_flops"],
                           product_gflops=rate / 1e9, floor_s=flops / rate)
            records.append(rec)
    return records


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def is_peer(path: str) -> bool:
    """Another library's path (not prefuse's own, not the materializing baseline)."""
    return not path.startswith(("prefuse", "materialized"))


def format_table(records: list[dict]) -> str:
    """Markdown table. Ratios are against the peers of the same shape: the fastest one's median time and the
    leanest one's extra memory (blank when no peer was measured). "matmul products": the path's matmul FLOPs per
    step in units of one [M, H] x [H, V] product over the M labeled rows; "floor s": those FLOPs at the faster rate
    of the plain products timed beside the paths (prefuse.bench.floor)."""
    lines = ["| shape | path | extra peak MiB | time s (median) | spread s | x fastest peer time | "
             "x leanest peer memory | matmul products | floor s | x floor |", "|---" * 10 + "|"]
    for rec in records:
        if "time_median_s" not in rec or "peak_extra_mib" not in rec:
            lines.append(f"| {rec['shape']} | {rec['path']} | error: {rec['errors'][0][:60]} | | | | | | | |")
            continue
        peers = [r for r in records if is_peer(r["path"]) and r["shape"] == rec["shape"]
                 and "time_median_s" in r and "peak_extra_mib" in r]
        fastest = min((r["time_median_s"] for r in peers), default=None)
        leanest = min((r["peak_extra_mib"] for r in peers), default=None)
        tr = f"{rec['time_median_s'] / fastest:.2f}" if fastest else ""
        mr = f"{rec['peak_extra_mib'] / leanest:.2f}" if leanest else ""
        if "floor_s" in rec:
            over = rec["time_median_s"] / rec["floor_s"]
            fl = f"{rec['matmul_products']:.2f} | {rec['floor_s']:.3f} | {over:.2f}"
        else:
            fl = "n/a | | "
        lines.append(f"| {rec['shape']} | {rec['path']} | {rec['peak_extra_mib']:.0f} | {rec['time_median_s']:.3f} "
                     f"| {rec['time_min_s']:.3f}-{rec['time_max_s']:.3f} | {tr} | {mr} | {fl} |")
    return "\n".join(lines)


def save(records: list[dict], path: str, command: str) -> None:
    with open(path, "w") as f:
        json.dump({"command": command, "machine": machine(), "records": records}, f, indent=1)


__all__ = ["run", "format_table", "save", "available_paths", "asdict"]
