"""The over-optimisation monitor's section of `prefuse train`'s settings (engine/methods/monitor.py reads it;
docs/methods/monitor.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from prefuse.engine.checks import check_field, setting

INDICATORS = {"entropy": "topk_entropy", "mass": "topk_mass"}
# the fused statistics kernel keeps a running top-64 (kernels/triton_ops.py MAX_TOP_K): larger k fail on the GPU
MAX_TOP_K = 64


@dataclass
class MonitorSettings:
    monitor_steps: int = setting(0, "every N steps: top-k entropy and mass of the policy's samples on held-out prompts "
                                    "(0: no monitor)")
    monitor_prompts: str | None = setting(None, "the monitor's prompts (default: the eval split's); chosen responses "
                                                "too if it has")
    monitor_samples: int = setting(16, "how many held-out prompts the monitor reads")
    monitor_top_k: int = setting(10, "k of the top-k indicators")
    monitor_extra_top_k: list[int] | None = setting([5, 20, 50], "further k whose top-k entropy and mass are logged "
                                                                 "too (monitor/topk_entropy@k); none: off")
    monitor_ema: float = setting(0.5, "decay of the indicators' EMA (0: none)")
    monitor_patience: int = setting(3, "falls of the EMA in a row after its peak that flag over-optimisation")
    monitor_min_delta: float = setting(0.0, "a fall counts only when the EMA drops by more than this")
    monitor_indicator: str | None = setting(None, "entropy or mass (default: mass for hinge, entropy otherwise)")
    monitor_max_new_tokens: int = setting(64, "the monitor's longest sampled response")
    monitor_keep_best: bool = setting(False, "keep the checkpoint at the EMA's peak as output_dir/best/ (on with "
                                             "--early_stopping)")
    early_stopping: bool = setting(False, "stop when the monitor flags over-optimisation; output_dir/best/ holds the "
                                          "peak")

    def check(self) -> None:
        """One-line ValueErrors naming the flag; monitor_extra_top_k becomes a sorted list of ints."""
        on = self.monitor_steps > 0
        check_field(self.monitor_steps >= 0, "monitor_steps",
                    f"must be >= 0 (0: no monitor), got {self.monitor_steps}")
        for name in ("early_stopping", "monitor_keep_best", "monitor_prompts"):
            check_field(on or not getattr(self, name), name, "needs --monitor_steps N > 0 (how often the monitor "
                                                             "evaluates)")
        check_field(self.monitor_samples >= 1, "monitor_samples", f"must be at least 1, got {self.monitor_samples}")
        check_field(self.monitor_top_k >= 1, "monitor_top_k", f"must be at least 1, got {self.monitor_top_k}")
        check_field(self.monitor_top_k <= MAX_TOP_K, "monitor_top_k",
                    f"must be at most {MAX_TOP_K} (the fused statistics kernel's top-k), got {self.monitor_top_k}")
        self.monitor_extra_top_k = extra_top_ks(self.monitor_extra_top_k)  # "none" / [] -> [], text -> ints
        check_field(math.isfinite(self.monitor_min_delta) and self.monitor_min_delta >= 0, "monitor_min_delta",
                    f"must be >= 0 (a fall is a drop of the EMA by more than this), got {self.monitor_min_delta}")
        check_field(0 <= self.monitor_ema < 1, "monitor_ema",
                    f"must be in [0, 1) (the EMA's decay; 0: no smoothing), got {self.monitor_ema}")
        check_field(self.monitor_patience >= 1, "monitor_patience",
                    f"must be at least 1, got {self.monitor_patience}")
        check_field(self.monitor_max_new_tokens >= 1, "monitor_max_new_tokens",
                    f"must be at least 1, got {self.monitor_max_new_tokens}")
        check_field(self.monitor_indicator in (None, *INDICATORS), "monitor_indicator",
                    f"{self.monitor_indicator!r} is not entropy or mass (default: by the objective)")
        if self.monitor_prompts:
            check_field(Path(self.monitor_prompts).is_file(), "monitor_prompts",
                        f"no such file: {self.monitor_prompts}")


def extra_top_ks(value) -> list[int]:
    """--monitor_extra_top_k as distinct ints, smallest first: a list of whole numbers (text from the command
    line), one number, or none / an empty list (off). ValueError `monitor_extra_top_k: ...`."""
    items = [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
    if [str(item).strip().lower() for item in items] == ["none"]:
        return []
    ks = []
    for item in items:
        text = str(item).strip()
        whole = not isinstance(item, (bool, float)) and text.isascii() and text.isdigit()
        check_field(whole, "monitor_extra_top_k", f"expected whole numbers (or none), got {item!r}")
        check_field(1 <= int(text) <= MAX_TOP_K, "monitor_extra_top_k",
                    f"each k must be in [1, {MAX_TOP_K}] (the fused statistics kernel's top-k), got {text}")
        ks.append(int(text))
    return sorted(set(ks))
