"""The reference's log-prob sums of a whole data set, computed once and cached beside the checkpoints.

`--precompute_ref_log_probs`: `ReferenceCache.load_or_build(path, step, batches)` writes
`ref_logps-<split>-<hash>.safetensors` ({ref_<role>_logps: [N]} for every role of the examples) atomically, and
`lookup(batch)` gives a batch's rows of it; the reference model is then no longer needed.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import torch

from prefuse.engine.core.sources import Batch


def cache_path(output_dir: Path, split: str, parts: Iterable, examples: list[dict]) -> Path:
    """The cache file for `split`: the hash covers `parts` (paths, dtypes, roles) and every example's token ids
    (and images: data/images.py `ExampleImages.key`)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
    digest.update(json.dumps([{k: v.key() if k == "images" else v for k, v in e.items()
                               if k.endswith("_ids") or k == "images"} for e in examples], sort_keys=True).encode())
    return Path(output_dir) / f"ref_logps-{split}-{digest.hexdigest()[:16]}.safetensors"


class ReferenceCache:
    def __init__(self, table: dict[str, torch.Tensor]):
        self.table = table

    @classmethod
    def load_or_build(cls, path: Path, n_examples: int, batches: Iterable[Batch], reference_sums, device):
        """The cache at `path` when it holds n_examples rows, else built from `batches` (every example once, in
        order) with `reference_sums(batch) -> {name: [B]}` and written atomically."""
        from safetensors.torch import load_file, save_file

        if path.is_file():
            table = load_file(str(path))
            if all(v.shape[0] == n_examples for v in table.values()):
                return cls({k: v.to(device) for k, v in table.items()})
        parts: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            for name, sums in reference_sums(batch.to(device)).items():
                parts.setdefault(name, []).append(sums.float().cpu())
        table = {name: torch.cat(values) for name, values in parts.items()}
        temp = path.with_suffix(".tmp")
        save_file(table, str(temp))
        os.replace(temp, path)
        print(f"reference log-probs of {n_examples} examples cached in {path}", flush=True)
        return cls({k: v.to(device) for k, v in table.items()})

    def lookup(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{ref_<role>_logps: [B]} of the batch's examples."""
        return {name: values[batch.index] for name, values in self.table.items()}
