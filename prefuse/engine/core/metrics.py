"""The training log: step metrics averaged over each logging window, one JSON object per logged step in
`output_dir/metrics.jsonl` (TRL's names: `loss`, `rewards/margins`, ...), and TensorBoard when it is installed.
Every line is strict JSON: a NaN or infinite value is written as null (never the bare NaN / Infinity tokens that
strict parsers reject).

The open window is part of a checkpoint's trainer state, so a resumed run logs exactly what an uninterrupted one
would; on resume, lines after the checkpoint's step (written by the interrupted run) are dropped first.
"""
from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path

import torch

# the value at the logged step rather than the window's mean
LAST_VALUE = ("learning_rate", "grad_norm", "nonfinite_steps_skipped")


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch, or this process's peak resident memory on the CPU, in MiB."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class MetricsLog:
    def __init__(self, output_dir: str | Path, *, resume_step: int | None = None, report_to: str = "auto",
                 window: dict | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.is_file():
            self.path.unlink()  # a fresh run in an old output_dir starts a fresh log
        self.window = window or self._empty()
        self.writer = _tensorboard(Path(output_dir) / "runs", report_to)

    @staticmethod
    def _empty() -> dict:
        return {"steps": 0, "sums": {}, "last": {}, "tokens": 0, "seconds": 0.0}

    def window_state(self) -> dict:
        return self.window

    def add(self, step_metrics: dict[str, float], *, tokens: int, seconds: float) -> None:
        w = self.window
        w["steps"] += 1
        w["tokens"] += tokens
        w["seconds"] += seconds
        for key, value in step_metrics.items():
            if key in LAST_VALUE:
                w["last"][key] = float(value)
            else:
                w["sums"][key] = w["sums"].get(key, 0.0) + float(value)
                counts = w.setdefault("counts", {})  # a key some steps lack (a Mixed-DPO batch without online
                counts[key] = counts.get(key, 0) + 1  # pairs has no judge scores) averages over the steps it has

    def flush(self, step: int, *, epoch: float, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Write the window's record for `step` (with `extra`, e.g. eval metrics) and start a new window."""
        w = self.window
        record = {"step": step, "epoch": epoch}
        counts = w.get("counts", {})  # absent from a window saved before per-key counts: every key every step
        record.update({key: total / max(counts.get(key, w["steps"]), 1) for key, total in w["sums"].items()})
        record.update(w["last"])
        record["tokens_per_second"] = w["tokens"] / w["seconds"] if w["seconds"] > 0 else 0.0
        record["peak_memory_mib"] = peak_memory_mib()
        record.update(extra or {})
        self.write(record)
        self.window = self._empty()
        return record

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(strict_json(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(key.replace("eval_", "eval/", 1), value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def strict_json(record: dict) -> str:
    """`record` as one line of strict JSON: a float that is NaN or infinite becomes null (at any depth)."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value
    return json.dumps(finite(record), allow_nan=False)


def _tensorboard(log_dir: Path, report_to: str):
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if report_to == "tensorboard":
            raise ValueError("report_to: tensorboard is not installed (pip install tensorboard)") from None
        return None
    return SummaryWriter(str(log_dir))
