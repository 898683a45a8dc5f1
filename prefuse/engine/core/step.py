"""The training step: which forward passes a batch needs, then the fused loss over the batch's roles.

    step = Step(models, loss_fn, needs, bf16=False)
    loss, metrics = step(batch)                     # policy decoder -> (reference) -> PreferenceLoss
    loss, metrics = step(batch, reference=cache)    # the reference's sums from a ReferenceCache instead
    step = Step(models, loss_fn, needs, padding_free=True)   # the decoders run the batch's sequences packed

The policy's decoder runs on every sequence of the batch; the reference's (the separate model, or the policy with
its LoRA adapters disabled) only when the objective reads reference log-probs and no cache holds them. Neither
calls an lm_head: the last hidden states go through the fused head. With padding_free the decoders run the
batch's sequences packed into rows without padding (engine/data/packing.py: position ids restart with each
sequence, the model's mask keeps attention within it) and `PreferenceLoss` reads each labeled position's hidden
state where the packing put it; the reference cache's sums are taken on the padded batch.
"""
from __future__ import annotations

import contextlib

import torch

from prefuse.algorithms.roles import input_name
from prefuse.engine.core.objectives import ObjectiveNeeds
from prefuse.engine.core.sources import Batch
from prefuse.engine.data.packing import PackedRows, pack_sequences
from prefuse.engine.models.loading import (
    Models,
    check_packable,
    decoder_hidden_states,
    packed_row_tokens,
    reference_hidden_states,
)
from prefuse.heads import head_of, reference_logps
from prefuse.preference import PreferenceLoss


class Step:
    """(loss, metrics) of one Batch under the policy; the loss is the mean over the batch's examples."""

    def __init__(self, models: Models, loss_fn: PreferenceLoss, needs: ObjectiveNeeds, *, bf16: bool = False,
                 row_temperature: dict[str, float] | None = None, padding_free: bool = False,
                 padding_free_row_tokens: int | None = None):
        """row_temperature: {role: T} whose rows' log-probs (policy and reference) are taken at T apart from the
        head's own temperature (HyPO's online samples beside its offline pairs) for a batch that carries no
        temperatures of its own (Batch.temperature: each sequence's, passed to the fused head as a per-sequence
        tensor, logits_row / T_row, with or without an lm_head bias or softcap). padding_free: run the decoders on the batch's
        sequences packed (module docstring), in rows of at most padding_free_row_tokens (default:
        loading.packed_row_tokens, one row under flash-attention, else rows no wider than the padded batch); a model
        that cannot take them is refused here."""
        self.models, self.loss_fn, self.needs, self.bf16 = models, loss_fn, needs, bf16
        self.row_temperature = dict(row_temperature or {})
        self.padding_free, self.padding_free_row_tokens = padding_free, padding_free_row_tokens
        head_of(models.policy)  # an lm_head the fused head cannot compute (a LoRA variant on it, ...) is refused here
        if padding_free:
            for model in (models.policy, models.reference):
                if model is not None:
                    check_packable(model)

    @property
    def head(self):
        """The policy's head, read per call: FSDP2 swaps the lm_head's parameter (sharded; whole in its forward)."""
        return head_of(self.models.policy)

    @property
    def ref_head(self):
        """The reference's head: its own model's, or the policy's with its adapters disabled (the base lm_head
        without a LoRA adapter on it); read per call, since an online run's iterations replace the reference."""
        return head_of(self.models.reference) if self.models.reference is not None else self.head.base()

    def autocast(self, device: torch.device):
        """bf16 autocast around the decoders only; the fused head accumulates in float32 itself."""
        return torch.autocast(device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def __call__(self, batch: Batch, reference=None, **inputs) -> tuple[torch.Tensor, dict]:
        """inputs: further objective inputs beside the batch's (OFS-DPO's slow adapter's sums)."""
        ref = {}
        packed = self.packed(batch)
        if self.needs.reference and reference is not None:
            ref = reference.lookup(batch)
        elif self.needs.reference:  # first: its temporaries are freed before the policy's activations are made
            ref_head = self.ref_head.detached()
            ref_hidden = self.reference_hidden(batch, packed)
            ref = dict(ref_hidden=ref_hidden, ref_weight=ref_head.weight, ref_bias=ref_head.bias,
                       ref_low_rank=ref_head.low_rank(ref_hidden))
        with self.autocast(batch.input_ids.device):
            input_ids, attention_mask, decoder_inputs = self.decoder_inputs(batch, packed)
            hidden = decoder_hidden_states(self.models.policy, input_ids, attention_mask, **decoder_inputs)
        temperature = self.temperatures(batch)
        if temperature is not None:
            inputs = {**inputs, "temperature": temperature}
        if packed is not None:
            inputs = {**inputs, "hidden_index": packed.hidden_index}
        head = self.head
        hidden = hidden.to(head.weight.dtype)
        loss, metrics, inputs = self.loss_fn(hidden, head.weight, batch.labels, roles=batch.roles, bias=head.bias,
                                             low_rank=head.low_rank(hidden), return_inputs=True, **ref,
                                             **batch.inputs, **inputs)
        if batch.metrics:  # an online batch: how it was made, and TRL's KL and entropy of the sampled responses
            metrics = {**metrics, **{k: torch.tensor(float(v)) for k, v in batch.metrics.items()},
                       **sample_statistics(inputs, batch.roles)}
        return loss, metrics

    def packed(self, batch: Batch) -> PackedRows | None:
        """The batch's sequences packed into rows without padding (padding_free), else None."""
        if not self.padding_free:
            return None
        if batch.vision:
            raise ValueError("padding_free: a batch with images cannot be packed; train without padding_free")
        row_tokens = packed_row_tokens(self.models.policy, batch.input_ids.shape[1], self.padding_free_row_tokens)
        return pack_sequences(batch.input_ids, batch.attention_mask, row_tokens=row_tokens)

    @staticmethod
    def decoder_inputs(batch: Batch, packed: PackedRows | None) -> tuple:
        """(input_ids, attention_mask, {position_ids | vision inputs}) for decoder_hidden_states."""
        if packed is None:
            return batch.input_ids, batch.attention_mask, batch.vision
        return packed.input_ids, None, {"position_ids": packed.position_ids}

    def temperatures(self, batch: Batch) -> torch.Tensor | None:
        """[S] the temperature of each sequence's log-probs (policy and reference): the batch's own, else
        row_temperature's roles at theirs and the head's elsewhere; None: the head's own for every row."""
        if batch.temperature is not None:
            return batch.temperature.to(batch.labels.device)
        if not self.row_temperature:
            return None
        t = torch.full((batch.labels.shape[0],), float(self.loss_fn.temperature), device=batch.labels.device)
        for role, temperature in self.row_temperature.items():
            if role in batch.roles:
                t[batch.roles[role].reshape(-1).to(t.device)] = temperature
        return t

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

    def reference_hidden(self, batch: Batch, packed: PackedRows | None = None) -> torch.Tensor:
        """The reference's last hidden states [S, T, H] (packed: [R, L, H]), without gradient and in eval mode."""
        input_ids, attention_mask, inputs = self.decoder_inputs(batch, packed)
        with self.autocast(batch.input_ids.device):
            hidden = reference_hidden_states(self.models, input_ids, attention_mask, **inputs)
        return hidden.to(self.ref_head.weight.dtype)

    def reference_sums(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{ref_<role>_logps: [B]} of the batch's roles, without gradient (what a ReferenceCache stores)."""
        temperature = self.temperatures(batch)
        sums = reference_logps(self.reference_hidden(batch), self.ref_head, batch.labels,
                               **({} if temperature is None else {"temperature": temperature}))
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
