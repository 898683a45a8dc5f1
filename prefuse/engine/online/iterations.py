"""Iterations of online training (RLHF Workflow's iterative DPO, SELM): every `batches_per_iteration` batches
the reference becomes the policy as it is then, the previous iterate.

The iterate is written as `output_dir/iterate-<k>/` (a plain `save_pretrained` directory, LoRA merged), first to a
temporary directory then renamed, so a resumed run reloads the reference of its iteration exactly and an
interrupted write leaves no partial iterate.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import torch

from prefuse.engine.models.loading import Models


class Iterations:
    def __init__(self, models: Models, *, output_dir: str | Path, batches_per_iteration: int, count: int,
                 reference: str = "previous"):
        """reference: "previous" (the previous iterate, RLHF Workflow's and SELM's default) or "initial" (the
        starting model throughout: the iterations then only change the prompt slices)."""
        if batches_per_iteration < 1:
            raise ValueError(f"iterations: each iteration needs at least one batch, got {batches_per_iteration}")
        if reference not in ("previous", "initial"):
            raise ValueError(f"iteration_reference: {reference!r} is not 'previous' or 'initial'")
        self.models, self.out, self.every, self.count = models, Path(output_dir), batches_per_iteration, count
        self.moves = reference == "previous"

    def iteration(self, served: int) -> int:
        """The iteration (0-based) that the batch numbered `served` (0-based) belongs to."""
        return served // self.every

    def before_batch(self, served: int) -> None:
        """At the first batch of iteration k >= 1, the reference becomes the current policy (iterate k)."""
        if self.moves and served and served % self.every == 0:
            self._set_reference(self._snapshot(), self.iteration(served))

    def restore(self, served: int) -> None:
        """After a resume at batch `served`: the reference of its iteration, from the saved iterate."""
        k = self.iteration(served)
        if k == 0 or not self.moves:
            return
        from transformers import AutoModelForCausalLM

        path = self.out / f"iterate-{k}"
        if not (path / "config.json").is_file():
            raise ValueError(f"resume_from_checkpoint: {path} (the reference of iteration {k}) is missing")
        device = next(self.models.policy.parameters()).device
        reference = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(device)
        self._set_reference(reference, k, save=False)

    def _snapshot(self) -> torch.nn.Module:
        """A frozen copy of the policy as it is now: with LoRA, its adapters merged into a plain model."""
        policy = copy.deepcopy(self.models.policy)
        return policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy

    def _set_reference(self, reference: torch.nn.Module, k: int, save: bool = True) -> None:
        reference.requires_grad_(False)
        reference.eval()
        if save:
            final = self.out / f"iterate-{k}"
            temp = self.out / f".iterate-{k}.tmp"
            shutil.rmtree(temp, ignore_errors=True)
            reference.save_pretrained(temp)
            if self.models.tokenizer is not None:
                self.models.tokenizer.save_pretrained(temp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(temp, final)
        self.models.reference = reference
        print(f"iteration {k + 1}: the reference is now the policy after iteration {k} ({self.out / f'iterate-{k}'})",
              flush=True)
