"""Memory: one (path, shape) in a fresh process: warm-up, then the extra peak memory of one forward+backward step.
Time: one fresh process per shape runs every path, interleaved step by step for several rounds after warm-up, so
that the machine's drift (several percent over minutes on a shared CPU) falls on all paths alike.

Peak memory on CUDA is `torch.cuda.max_memory_allocated` above the inputs. On the CPU it is the process's resident
high-water mark (VmHWM) above the resident size before the step, with the high-water mark reset after warm-up
(/proc/self/clear_refs) and glibc told to map every large block so freed memory leaves the resident set.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

PRODUCT_KEY = "_matmul_floor"  # not a path name: the floor's terms in time_interleaved's result
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "2"}


@dataclass
class Measurement:
    path: str
    n: int
    h: int
    v: int
    dtype: str
    device: str
    ignore_frac: float
    peak_extra_mib: float | None = None
    time_median_s: float | None = None
    time_min_s: float | None = None
    time_max_s: float | None = None
    repeats: int = 0
    loss: float | None = None
    error: str | None = None


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _shape(task: str, n: int, h: int, v: int, batch: int) -> tuple:
    """head: (N, H, V); preference: (B, T, H, V) with N = 2 * B * T tokens."""
    return (batch, n // (2 * batch), h, v) if task == "preference" else (n, h, v)


def measure_here(path_name: str, n: int, h: int, v: int, dtype: str, device: str, ignore_frac: float,
                 repeats: int, batch: int = 1, frozen_weight: bool = False) -> Measurement:
    """Runs in the current process (call it in a fresh one)."""
    from prefuse.bench.paths import PATHS, make_task_inputs

    result = Measurement(path_name, n, h, v, dtype, device, ignore_frac)
    path = PATHS[path_name]
    inputs = make_task_inputs(path.task, _shape(path.task, n, h, v, batch), getattr(torch, dtype), device,
                              ignore_frac, frozen_weight=frozen_weight)
    hidden, weight = inputs[0], inputs[1]
    step = path.make(*inputs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(path.warmup):
        step()
    sync()
    hidden.grad = weight.grad = None
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step()
        sync()
        result.peak_extra_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _reset_peak()
        base = _rss_kib("VmRSS")
        loss = step()
        result.peak_extra_mib = (_rss_kib("VmHWM") - base) / 1024
    result.loss = float(loss)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    result.repeats = repeats
    result.time_median_s = statistics.median(times) if times else None
    result.time_min_s, result.time_max_s = (min(times), max(times)) if times else (None, None)
    return result


def measure(path_name: str, n: int, h: int, v: int, *, dtype: str = "float32", device: str = "cpu",
            ignore_frac: float = 0.25, repeats: int = 3, batch: int = 1, timeout: float = 1800,
            frozen_weight: bool = False) -> Measurement:
    """Measures in a fresh Python process; a failure is returned as `error`, not raised. n is the token count
    (2 * batch * T for a preference path)."""
    out = _run_fresh("measure_here", [path_name, n, h, v, dtype, device, ignore_frac, repeats, batch,
                                      frozen_weight], timeout)
    if "error" in out and "path" not in out:
        return Measurement(path_name, n, h, v, dtype, device, ignore_frac, error=out["error"])
    return Measurement(**out)


def time_interleaved_here(paths: list[str], n: int, h: int, v: int, dtype: str, device: str, ignore_frac: float,
                          rounds: int, batch: int = 1, frozen_weight: bool = False) -> dict:
    """Seconds per forward+backward step of each path, `rounds` steps each, the paths taking turns:
    {path: [seconds, ...]}, and under PRODUCT_KEY the matmul floor's terms (prefuse.bench.floor): each path's
    matmul FLOPs per step (one profiled step after warm-up), and the FLOP/s of plain products of the labeled
    rows (floor.reference_products), timed in the same turns."""
    from prefuse.bench import floor
    from prefuse.bench.paths import PATHS, make_task_inputs

    tasks = {PATHS[p].task for p in paths}
    if len(tasks) != 1:
        raise ValueError(f"paths: {paths} mix tasks {tasks}; time one task at a time")
    task = tasks.pop()
    inputs = make_task_inputs(task, _shape(task, n, h, v, batch), getattr(torch, dtype), device, ignore_frac,
                              frozen_weight=frozen_weight)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    steps = {p: PATHS[p].make(*inputs) for p in paths}
    for p in paths:
        for _ in range(PATHS[p].warmup):
            steps[p]()
    labeled = int((inputs[2] != -100).sum())
    products = floor.reference_products(inputs[0], inputs[1], labeled)
    flops = {p: floor.count_matmul_flops(steps[p]) for p in paths}
    timed = {**steps, **{f"{PRODUCT_KEY}/{name}": step for name, (step, _) in products.items()}}
    for name, (step, _) in products.items():
        step()
    times: dict[str, list[float]] = {p: [] for p in timed}
    for _ in range(rounds):
        for p, step in timed.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[p].append(time.perf_counter() - t0)
    rates = {name: products[name][1] / statistics.median(times.pop(f"{PRODUCT_KEY}/{name}")) for name in products}
    return {**times, PRODUCT_KEY: {"labeled_rows": labeled, "unit_flops": floor.product_flops(labeled, h, v),
                                   "matmul_flops": flops, "product_flops_per_s": rates}}


def time_interleaved(paths: list[str], n: int, h: int, v: int, *, dtype: str = "float32", device: str = "cpu",
                     ignore_frac: float = 0.25, rounds: int = 5, batch: int = 1, timeout: float = 3600,
                     frozen_weight: bool = False) -> dict:
    """Runs `time_interleaved_here` in a fresh process; returns {path: [seconds, ...]} or {"error": text}."""
    return _run_fresh("time_interleaved_here", [paths, n, h, v, dtype, device, ignore_frac, rounds, batch,
                                               frozen_weight], timeout)


def _run_fresh(function: str, args: list, timeout: float):
    env = dict(os.environ, **MALLOC_ENV)
    env.pop("TRITON_INTERPRET", None)
    code = "import sys; from prefuse.bench.measure import _main; _main(sys.argv[1], sys.argv[2])"
    try:
        proc = subprocess.run([sys.executable, "-c", code, function, json.dumps(args)], capture_output=True,
                              text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def _main(function: str, args_json: str) -> None:
    result = globals()[function](*json.loads(args_json))
    print(json.dumps(asdict(result) if isinstance(result, Measurement) else result))


