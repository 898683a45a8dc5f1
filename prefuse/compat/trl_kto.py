"""TRL's `KTOTrainer` with prefuse computing its loss: `PrefuseKTOTrainer` is a drop-in subclass.

    from prefuse.compat.trl_kto import PrefuseKTOTrainer
    trainer = PrefuseKTOTrainer(model=model, args=KTOConfig(loss_type="kto", ...), train_dataset=unpaired,
                                processing_class=tokenizer)
    trainer.train()

TRL 1.16 keeps KTO in `trl` (`trl.experimental.kto` only re-exports it). The policy and the reference run their
decoders only; their completions' log-prob sums (and the mismatched "KL" completions') come from the last hidden
states through `prefuse.kernels.linear_logprobs` (no [tokens x vocab] logits), and the loss is prefuse's registered
objective (`prefuse.algorithms.kto`: `kto` or `apo_zero_unpaired`), handed the KL completions' batch means of every
process (TRL's reference point: the mean over processes of each process's mean, clamped at 0). The metrics are TRL's,
under its names and with its reductions over processes (kl, entropy, num_tokens, logits/*, rewards/*, logps/*):
the entropy comes from the same pass of the head (`return_stats`), the mean logit without logits
(`prefuse.heads.mean_logit`).

Supported: loss_type kto and apo_zero_unpaired, beta, desirable_weight, undesirable_weight, precompute_ref_log_probs,
a reference model, PEFT (the reference: the "ref" adapter or the adapters disabled), FSDP2 (`accelerate launch`; a
sharded lm_head is gathered whole, see `prefuse.compat.trl_head`). Refused in one line: a MoE router aux loss, vision
inputs, models whose logits are scaled (logit_scale and the like), an lm_head that is not a plain Linear.
"""
from __future__ import annotations

import contextlib

import torch
from accelerate.utils import is_peft_model
from trl import KTOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from prefuse.algorithms import get_objective
from prefuse.compat.sharding import check_not_zero3
from prefuse.compat.trl import next_token_labels
from prefuse.compat.trl_head import IGNORE_INDEX, check_plain_logits, hidden_and_head
from prefuse.heads import mean_logit
from prefuse.kernels import linear_logprobs

# the collator's keys that are not the model's inputs, for the completions ("") and the KL completions ("KL_")
NON_MODEL_KEYS = {"completion_mask", "label", "ref_logps", "ref_KL_logps"}


class PrefuseKTOTrainer(KTOTrainer):
    """`trl.KTOTrainer` whose loss is prefuse's objective on log-probs from the fused head on hidden states."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE router aux loss is not supported by PrefuseKTOTrainer")
        if self._is_vision_dataset:
            raise ValueError("vision inputs are not supported by PrefuseKTOTrainer")
        check_plain_logits(self.model, "PrefuseKTOTrainer")
        check_not_zero3(self, "PrefuseKTOTrainer")
        self.objective = get_objective(self.loss_type)

    # -- the decoders and the head --------------------------------------------------------------------------------

    def _reference_context(self):
        """TRL's reference under PEFT: the "ref" adapter when loaded, else the adapters disabled."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    @staticmethod
    def _sequences(inputs, prefix=""):
        """(model inputs, labels [N, T]) of the completions (prefix "") or of the KL completions ("KL_")."""
        model_kwargs = {"input_ids": inputs[f"{prefix}input_ids"], "attention_mask": inputs[f"{prefix}attention_mask"]}
        return model_kwargs, next_token_labels(inputs[f"{prefix}input_ids"], inputs[f"{prefix}completion_mask"])

    def _logps(self, model, inputs, prefix="", stats=False):
        """Per-sequence log-prob sums [N] of `model` (differentiable when grad is enabled), and with `stats` the
        head's token statistics, the hidden states and the head (for the metrics)."""
        model_kwargs, labels = self._sequences(inputs, prefix)
        hidden, head = hidden_and_head(self.accelerator, model, model_kwargs)
        hidden = hidden[:, -labels.shape[1]:].to(head.weight.dtype)  # prompt-learning PEFT prepends virtual tokens
        out = linear_logprobs(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap, return_stats=stats,
                              top_k=1)
        if not stats:
            return out.sum(-1)
        token_logps, token_stats = out
        return token_logps.sum(-1), (token_stats, hidden.detach(), head, labels)

    def _reference_logps(self, inputs, reference=None):
        """The reference's sums [N] for the completions and (KTO) the KL completions, without gradient."""
        if reference is None:
            reference = self.ref_model if self.ref_model is not None else self.model
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_context():
            logps = self._logps(reference, inputs)
            kl_logps = self._logps(reference, inputs, "KL_") if self.calculate_KL else None
        return logps, kl_logps

    def compute_ref_log_probs(self, model, inputs):
        """(reference sums [N], KL completions' sums [N] or None) for precompute_ref_log_probs, through the head."""
        return self._reference_logps(inputs, model)

    # -- the loss -------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = inputs["label"].bool()
        policy_logps, extras = self._logps(model, inputs, stats=True)
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = inputs["ref_logps"], inputs.get("ref_KL_logps")
        else:
            ref_logps, ref_kl_logps = self._reference_logps(inputs)
        objective_inputs = {"policy_logps": policy_logps, "ref_logps": ref_logps.to(policy_logps), "labels": desirable}
        if self.calculate_KL:
            with torch.no_grad():
                policy_kl_logps = self._logps(model, inputs, "KL_")
            # TRL's reference point: the processes' means of the KL completions' log-ratio, averaged, clamped at 0;
            # the objective averages these per-process means (the mean of a difference is the difference of means)
            gather = self.accelerator.gather_for_metrics
            objective_inputs["policy_kl_logps"] = gather(policy_kl_logps.detach().mean()).reshape(-1)
            objective_inputs["ref_kl_logps"] = gather(ref_kl_logps.to(policy_kl_logps).mean()).reshape(-1)
        losses, objective_metrics = self.objective.fn(
            **objective_inputs, beta=self.beta, desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight)
        loss = losses.nanmean()
        kl = objective_metrics["kl"] if self.calculate_KL else torch.zeros(1, device=device)
        self._log_metrics(mode, kl, policy_logps.detach(), ref_logps, desirable, inputs, *extras)
        if return_outputs:  # TRL's deprecated path for compute_metrics, which wants logits: one plain forward
            with torch.no_grad():
                model_kwargs, _ = self._sequences(inputs)
                return loss, model(**model_kwargs, use_cache=False)
        return loss

    def _log_metrics(self, mode, kl, policy_logps, ref_logps, desirable, inputs, stats, hidden, head, labels):
        """TRL's metrics with its reductions: token-weighted over every process (entropy, logits/*), sums over the
        processes' desirable / undesirable examples divided by their counts (rewards/*, logps/*)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        metrics["kl"].append(kl.item())
        mask = labels != IGNORE_INDEX
        total, count = gather(stats.entropy[mask].sum()).sum(), gather(mask.sum()).sum()
        metrics["entropy"].append((total / count).item() if count > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            mean_logits = mean_logit(hidden, head.weight, head.bias)
        rewards = self.beta * (policy_logps - ref_logps.to(policy_logps))
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            token_mask = mask & rows[:, None]
            tokens = gather(token_mask.sum()).sum().item()
            if tokens > 0:
                metrics[f"logits/{side}"].append(gather(mean_logits[token_mask].sum()).sum().item() / tokens)
        counts = {side: gather(rows.sum()).sum().item() for side, rows in (("chosen", desirable),
                                                                           ("rejected", ~desirable))}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            if counts[side] > 0:
                metrics[f"rewards/{side}"].append(gather(rewards[rows].nansum()).nansum().item() / counts[side])
                metrics[f"logps/{side}"].append(gather(policy_logps[rows].nansum()).nansum().item() / counts[side])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
