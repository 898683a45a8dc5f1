"""The training step: which forward passes a batch needs, then the fused loss over the batch's roles.

    step = Step(models, loss_fn, needs, bf16=False)
    loss, metrics = step(batch)                     # policy decoder -> (reference) -> PreferenceLoss
    loss, metrics = step(batch, reference=cache)    # the reference's sums from a ReferenceCache instead

The policy's decoder runs on every sequence of the batch; the reference's (the separate model, or the policy with
its LoRA adapters disabled) only when the objective reads reference log-probs and no cache holds them. Neither
calls an lm_head: the last hidden states go through the fused head.
"""
from __future__ import annotations

import contextlib

import torch

from prefuse.algorithms.roles import input_name
from prefuse.engine.models.loading import Models, decoder_hidden_states, reference_hidden_states
from prefuse.engine.core.objectives import ObjectiveNeeds
from prefuse.engine.core.sources import Batch
from prefuse.heads import head_of, reference_logps
from prefuse.preference import PreferenceLoss


class Step:
    """(loss, metrics) of one Batch under the policy; the loss is the mean over the batch's examples."""

    def __init__(self, models: Models, loss_fn: PreferenceLoss, needs: ObjectiveNeeds, *, bf16: bool = False,
                 row_temperature: dict[str, float] | None = None):
        """row_temperature: {role: T} whose rows' log-probs (policy and reference) are taken at T apart from the
        head's own temperature: their hidden states are divided by T (logits / T for a head without bias and
        softcap: HyPO's online samples beside its offline pairs)."""
        self.models, self.loss_fn, self.needs, self.bf16 = models, loss_fn, needs, bf16
        self.row_temperature = dict(row_temperature or {})
        head_of(models.policy)  # a LoRA lm_head is refused here

    @property
    def head(self):
        """The policy's head, read per call: FSDP2 swaps the lm_head's parameter (sharded; whole in its forward)."""
        return head_of(self.models.policy)

    @property
    def ref_head(self):
        """The reference's head: its own model's, or the policy's (adapters disabled); read per call, since an
        online run's iterations replace the reference."""
        return head_of(self.models.reference) if self.models.reference is not None else self.head

    def autocast(self, device: torch.device):
        """bf16 autocast around the decoders only; the fused head accumulates in float32 itself."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def __call__(self, batch: Batch, reference=None, **inputs) -> tuple[torch.Tensor, dict]:
        """inputs: further objective inputs beside the batch's (OFS-DPO's slow adapter's sums)."""
        ref = {}
        if self.needs.reference and reference is not None:
            ref = reference.lookup(batch)
        elif self.needs.reference:  # first: its temporaries are freed before the policy's activations are made
            ref = dict(ref_hidden=self.reference_hidden(batch), ref_weight=self.ref_head.weight.detach(),
                       ref_bias=None if self.ref_head.bias is None else self.ref_head.bias.detach())
        with self.autocast(batch.input_ids.device):
            hidden = decoder_hidden_states(self.models.policy, batch.input_ids, batch.attention_mask, **batch.vision)
        if self.row_temperature:
            hidden = self.tempered(hidden, batch.roles)
            if "ref_hidden" in ref:
                ref["ref_hidden"] = self.tempered(ref["ref_hidden"], batch.roles)
        loss, metrics, inputs = self.loss_fn(hidden.to(self.head.weight.dtype), self.head.weight, batch.labels,
                                             roles=batch.roles, bias=self.head.bias, return_inputs=True, **ref,
                                             **batch.inputs, **inputs)
        if batch.metrics:  # an online batch: how it was made, and TRL's KL and entropy of the sampled responses
            metrics = {**metrics, **{k: torch.tensor(float(v)) for k, v in batch.metrics.items()},
                       **sample_statistics(inputs, batch.roles)}
        return loss, metrics

    def tempered(self, hidden: torch.Tensor, roles: dict) -> torch.Tensor:
        """hidden [S, T, H] with the rows of each role in row_temperature divided by its temperature."""
        scale = torch.ones(hidden.shape[0], dtype=hidden.dtype, device=hidden.device)
        for role, temperature in self.row_temperature.items():
            if role in roles:
                scale[roles[role].reshape(-1).to(hidden.device)] = 1.0 / temperature
        return hidden * scale.view(-1, *([1] * (hidden.dim() - 1)))

    def held_out_metrics(self, parts: list[tuple[int, torch.Tensor, dict]], world) -> dict[str, float]:
        """The metrics of a held-out set from its batches' (n_examples, loss, metrics): mean_over_examples."""
        return mean_over_examples(parts, world)

    def after_update(self, step: int, metrics: dict, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Called after each optimizer step; a step with state of its own (OFS-DPO's roles) acts and logs here."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reference_hidden(self, batch: Batch) -> torch.Tensor:
        """The reference's last hidden states [S, T, H], without gradient and in eval mode."""
        with self.autocast(batch.input_ids.device):
            hidden = reference_hidden_states(self.models, batch.input_ids, batch.attention_mask, **batch.vision)
        return hidden.to(self.ref_head.weight.dtype)

    def reference_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{ref_<role>_logps: [B]} of the batch's roles, without gradient (what a ReferenceCache stores)."""
        sums = reference_logps(self.reference_hidden(batch), self.ref_head, batch.labels)
        return {input_name(role, "logps", "ref"): sums[rows] for role, rows in batch.roles.items()}


def mean_over_examples(parts: list[tuple[int, torch.Tensor, dict]], world) -> dict[str, float]:
    """{"loss": ..., metric: ...}: each batch's (n_examples, loss, metrics) weighted by its examples, summed over
    the ranks of `world` (engine/train/distributed.World: each rank holds its share of the batches)."""
    sums, count = {}, 0
    for n_examples, loss, metrics in parts:
        for key, value in {"loss": loss, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(value) * n_examples
        count += n_examples
    sums, count = world.sum_metrics(sums), world.total(count)
    return {key: value / count for key, value in sums.items()}


def sample_statistics(inputs: dict, roles: dict) -> dict[str, torch.Tensor]:
    """TRL's online metrics over the sampled responses of a batch (every role but a reference's `sample`):
    objective/kl = mean of sum_t (log pi - log pi_ref), objective/entropy = mean of -sum_t log pi."""
    policy, ref = [], []
    for role in roles:
        if role == "sample":
            continue
        name = "logps" if role == "completion" else f"{role}_logps"
        if f"policy_{name}" in inputs:
            policy.append(inputs[f"policy_{name}"].reshape(-1))
            if f"ref_{name}" in inputs:
                ref.append(inputs[f"ref_{name}"].reshape(-1))
    out = {}
    if policy:
        out["objective/entropy"] = -torch.cat(policy).float().mean()
        if len(ref) == len(policy):
            out["objective/kl"] = (torch.cat(policy) - torch.cat(ref)).float().mean()
    return out
