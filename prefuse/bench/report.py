"""Side-by-side runs of the head paths: every (shape, path) measured in fresh processes, paths interleaved round by
round so that machine noise falls on all of them alike; a table and a JSON file come out."""
from __future__ import annotations

import json
import platform
import statistics
from dataclasses import asdict

import torch

from prefuse.bench.measure import Measurement, measure
from prefuse.bench.paths import PATHS

DEFAULT_SHAPES = [(4096, 1024, 32000)]
QUICK_SHAPES = [(512, 128, 4096)]


def available_paths(device: str) -> list[str]:
    return [name for name, path in PATHS.items() if path.available(device)]


def run(paths: list[str], shapes: list[tuple[int, int, int]], *, dtype: str = "float32", device: str = "cpu",
        ignore_frac: float = 0.25, rounds: int = 3, repeats: int = 3, log=print) -> list[dict]:
    """For each shape: `rounds` rounds, each measuring every path once in a fresh process (`repeats` timed steps
    after warm-up). Returns one record per (shape, path): median time over all timed steps' medians, its spread,
    and the median extra peak memory."""
    records = []
    for n, h, v in shapes:
        per_path: dict[str, list[Measurement]] = {p: [] for p in paths}
        for r in range(rounds):
            for p in paths:
                m = measure(p, n, h, v, dtype=dtype, device=device, ignore_frac=ignore_frac, repeats=repeats)
                per_path[p].append(m)
                status = m.error or f"{m.peak_extra_mib:.0f} MiB, {m.time_median_s:.3f} s"
                log(f"  round {r + 1}/{rounds}  N={n} H={h} V={v}  {p:28s} {status}")
        for p, ms in per_path.items():
            ok = [m for m in ms if not m.error]
            rec = {"path": p, "n": n, "h": h, "v": v, "dtype": dtype, "device": device, "ignore_frac": ignore_frac,
                   "rounds": len(ok), "errors": [m.error for m in ms if m.error]}
            if ok:
                times = [m.time_median_s for m in ok]
                rec.update(time_median_s=statistics.median(times), time_min_s=min(m.time_min_s for m in ok),
                           time_max_s=max(m.time_max_s for m in ok),
                           peak_extra_mib=statistics.median(m.peak_extra_mib for m in ok), loss=ok[0].loss)
            records.append(rec)
    return records


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def format_table(records: list[dict], baseline: str = "materialized") -> str:
    lines = ["| N | H | V | path | extra peak MiB | time s (median) | spread s | x materialized time | "
             "x materialized memory |", "|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        base = next((r for r in records if r["path"] == baseline and (r["n"], r["h"], r["v"]) ==
                     (rec["n"], rec["h"], rec["v"]) and "time_median_s" in r), None)
        if "time_median_s" not in rec:
            lines.append(f"| {rec['n']} | {rec['h']} | {rec['v']} | {rec['path']} | error: "
                         f"{rec['errors'][0][:60]} | | | | |")
            continue
        tr = f"{rec['time_median_s'] / base['time_median_s']:.2f}" if base else ""
        mr = f"{rec['peak_extra_mib'] / base['peak_extra_mib']:.2f}" if base else ""
        lines.append(f"| {rec['n']} | {rec['h']} | {rec['v']} | {rec['path']} | {rec['peak_extra_mib']:.0f} | "
                     f"{rec['time_median_s']:.3f} | {rec['time_min_s']:.3f}-{rec['time_max_s']:.3f} | {tr} | {mr} |")
    return "\n".join(lines)


def save(records: list[dict], path: str, command: str) -> None:
    with open(path, "w") as f:
        json.dump({"command": command, "machine": machine(), "records": records}, f, indent=1)


__all__ = ["run", "format_table", "save", "available_paths", "asdict"]
