"""The exact linear combination of LoRA adapters: `prefuse merge-adapters` (COFS-DPO's combination of domains).

    merge_adapters(["fast_a", "fast_b"], [0.5, 0.5], "combined")      # combined/: one peft adapter

The result's weight update is sum_k lambda_k * B_k A_k exactly: peft's `add_weighted_adapter` with
`combination_type="cat"` stacks the factors (lambda_k * scaling_k * A_k under B_k; rank = sum of the ranks, scaling
1). Its `"linear"` combines A and B separately, whose product has cross terms, which is not that combination.
The output is written to a temporary directory and renamed into place: an interrupted merge leaves nothing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from prefuse.engine.models.loading import check_weight_files

CONFIG = "adapter_config.json"


def _adapter_config(path: str) -> dict:
    file = Path(path) / CONFIG
    if not file.is_file():
        raise ValueError(f"adapters: {path} has no {CONFIG}; pass LoRA adapter directories (peft's layout, as "
                         f"prefuse checkpoints of LoRA runs write them)")
    return json.loads(file.read_text())


def _check_one_base(adapters: list[str], configs: list[dict]) -> None:
    """A ValueError naming two adapters whose recorded base models differ: their updates apply to different
    weights, and summing them means nothing (peft would stop on the first shape that differs, or, for bases of one
    shape, merge silently)."""
    bases = [config.get("base_model_name_or_path") for config in configs]
    for path, other in zip(adapters[1:], bases[1:]):
        if other and bases[0] and os.path.realpath(other) != os.path.realpath(bases[0]):
            raise ValueError(f"adapters: {adapters[0]} was trained on {bases[0]!r}, {path} on {other!r}; merge "
                             f"adapters of one base model (pass --base DIR if both name the same model)")


def merge_adapters(adapters: list[str], weights: list[float], output: str, base: str | None = None) -> Path:
    """Write the adapter whose update is sum_k weights[k] * (update of adapters[k]) to `output` and return it.
    base: the model the adapters were trained on (default: the first adapter's base_model_name_or_path)."""
    if len(adapters) < 1:
        raise ValueError("adapters: give at least one adapter directory")
    if len(weights) != len(adapters):
        raise ValueError(f"weights: {len(weights)} weight(s) for {len(adapters)} adapter(s)")
    configs = [_adapter_config(a) for a in adapters]
    if base is None:
        _check_one_base(adapters, configs)
    base = base or configs[0].get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise ValueError(f"base: {base!r} is not a model directory; pass --base DIR (the model the adapters were "
                         f"trained on)")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    check_weight_files(base, "base")
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    names = [f"adapter_{k}" for k in range(len(adapters))]
    current = adapters[0]
    try:
        peft_model = PeftModel.from_pretrained(model, current, adapter_name=names[0])
        for name, current in zip(names[1:], adapters[1:]):
            peft_model.load_adapter(current, adapter_name=name)
    except RuntimeError as error:  # torch's "size mismatch for <name>: copying a param with shape ..." list
        if "size mismatch" not in str(error):
            raise
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), "")
        raise ValueError(f"adapters: {current} was not trained on the base {base} (its shapes differ: "
                         f"{first.removeprefix('size mismatch for ').rstrip('.')}); merge adapters of one base "
                         f"model") from None
    peft_model.add_weighted_adapter(names, [float(w) for w in weights], adapter_name="default",
                                    combination_type="cat")
    out = Path(output)
    temp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(temp, ignore_errors=True)
    peft_model.save_pretrained(temp, selected_adapters=["default"])
    shutil.rmtree(out, ignore_errors=True)
    os.replace(temp, out)
    return out
