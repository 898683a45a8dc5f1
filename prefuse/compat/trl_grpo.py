"""TRL's `GRPOTrainer` with every log-prob computed by prefuse's fused head: `PrefuseGRPOTrainer` is a drop-in subclass.

    from prefuse.compat.trl_grpo import PrefuseGRPOTrainer
    trainer = PrefuseGRPOTrainer(model=model, reward_funcs=my_reward, args=GRPOConfig(...), train_dataset=prompts,
                                 processing_class=tokenizer)
    trainer.train()

TRL samples, scores and computes its advantages as it does; the per-token log-probs of the completions (the policy's
with gradient, the old policy's and the reference's without) and their entropies come from the decoder's last hidden
states through `prefuse.kernels.linear_logprobs` (one pass, `return_stats=True` for the entropy): no [tokens x vocab]
logits. TRL's loss (`_compute_loss`: the clipped surrogate, the KL term, the loss_type's normalization, the metrics
it logs under its own names) then runs unchanged on those per-token log-probs. prefuse's registered `grpo` objective
is not used here: it normalizes rewards within one process's groups, while TRL's advantages are normalized over the
groups of every process before each takes its slice.

Supported: every loss_type of TRL 1.16 (grpo, dr_grpo, dapo, bnpo, luspo, cispo, sapo, vespo: each a function of the
per-token log-probs), importance_sampling_level token and sequence, beta (KL), epsilon / epsilon_high / delta,
top_entropy_quantile (the mask reads the head's entropy, without gradient), temperature (the head divides the logits
by it, as TRL's), mask_truncated_completions, off_policy_mask_threshold, num_iterations, PEFT (the reference: the
adapters disabled), FSDP2 (`accelerate launch`; a sharded lm_head is gathered, see `prefuse.compat.trl_head`).
Refused in one line: an entropy bonus (entropy_coef, use_adaptive_entropy: it needs the entropy's gradient, which
the head does not give), cast_lm_head_to_fp32, a MoE router aux loss, vision inputs, models whose logits are scaled
(logit_scale and the like), an lm_head that is not a plain Linear.
"""
from __future__ import annotations

import torch
from trl import GRPOTrainer

from prefuse.compat.sharding import check_not_zero3
from prefuse.compat.trl_head import IGNORE_INDEX, check_plain_logits, hidden_and_head
from prefuse.kernels import linear_logprobs


class PrefuseGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose per-token log-probs and entropies come from prefuse's fused head on hidden states."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.entropy_coef != 0.0 or self.use_adaptive_entropy:
            raise ValueError("entropy_coef / use_adaptive_entropy: the entropy bonus needs the entropy's gradient, "
                             "which PrefuseGRPOTrainer's head does not give; set entropy_coef=0.0")
        if self.args.cast_lm_head_to_fp32:
            raise ValueError("cast_lm_head_to_fp32: not supported by PrefuseGRPOTrainer (its head computes in the "
                             "lm_head weight's dtype, accumulating in float32); leave it False")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE router aux loss is not supported by PrefuseGRPOTrainer")
        check_plain_logits(self.model, "PrefuseGRPOTrainer")
        check_not_zero3(self, "PrefuseGRPOTrainer")

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """(log-probs [B, K], entropies [B, K] or None, None) of the last K = logits_to_keep tokens of each row, 0 at
        padding, from the decoder's hidden states through the fused head, in chunks of `batch_size` rows."""
        if any(value is not None for value in multimodal.values()):
            raise ValueError("vision inputs are not supported by PrefuseGRPOTrainer")
        if compute_aux_loss:
            raise ValueError("router_aux_loss_coef: the MoE router aux loss is not supported by PrefuseGRPOTrainer")
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            # the hidden state at t predicts token t + 1: the K completion tokens read the K positions before them
            labels = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, IGNORE_INDEX)
            hidden, head = hidden_and_head(self.accelerator, model, {"input_ids": ids, "attention_mask": mask})
            hidden = hidden[:, -logits_to_keep - 1:-1].to(head.weight.dtype)
            out = linear_logprobs(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap,
                                  temperature=self.temperature, return_stats=compute_entropy, top_k=1)
            logps, stats = out if compute_entropy else (out, None)
            all_logps.append(logps)
            if compute_entropy:
                all_entropies.append(stats.entropy)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None
