"""TRL's `DPOTrainer` with prefuse computing its loss: `PrefuseDPOTrainer` is a drop-in subclass.

    from prefuse.compat.trl import PrefuseDPOTrainer
    trainer = PrefuseDPOTrainer(model=model, args=DPOConfig(loss_type="sigmoid", ...), train_dataset=pairs,
                                processing_class=tokenizer, peft_config=LoraConfig(...))
    trainer.train()

The policy and the reference run only their decoders: `model(..., prefuse_hidden_states=True)` returns the last
hidden states, and `PreferenceLoss` takes them through the lm_head chunk by chunk (no [tokens x vocab] logits).
The call goes through the model's own forward, so PEFT and distributed wrappers stay in the path. The reference is
TRL's: the disabled (or "ref") adapter under PEFT, `ref_model` when given, or precomputed log-probs.

Distributed: under `accelerate launch` with FSDP2 the lm_head weight the head reads may be a DTensor shard (after a
forward without gradient, or when the lm_head is a unit of its own); `prefuse.compat.sharding.full_head` gathers it
whole and averages the processes' gradients back into the shard. Exercised on 2 CPU processes (gloo) against one
process, tied and untied embeddings and the lm_head as its own unit: losses to 1e-6, gradients to 1e-5
(tests/test_distributed_trl.py). DeepSpeed ZeRO-3 is refused in one line (it partitions the lm_head to numel 0
outside its module's forward); DDP and ZeRO-1/2 are not exercised (docs/distributed.md says why).

Supported: every loss_type of TRL 1.16's DPO (one or several, with loss_weights), beta, label_smoothing,
discopop_tau, f_divergence_type, f_alpha_divergence_coef, ld_alpha (LD-DPO: `PreferenceLoss` forms the verbose
part of each response from its token log-probs), precompute_ref_log_probs. Logged: TRL's metric names
(rewards/*, logps/*, logits/*, entropy, mean_token_accuracy, num_tokens); the token statistics take one extra
forward-only pass of the fused head, which also gives use_weighting (WPO) its log sum_v p(v)^2 per token (passed to
`PreferenceLoss`, no pass of its own). Not supported (a ValueError says so): ld_alpha with
precompute_ref_log_probs, a router aux loss
(MoE), vision inputs, an lm_head that is neither a plain Linear nor peft's LoRA Linear around one (DoRA and other
variants, several active adapters). The head comes from `prefuse.heads.head_of`, Gemma-2's final-logit softcap
included (TRL's logits apply it; only logits/* then average the uncapped logits), and so does a LoRA adapter on the
lm_head (`lm_head` in the LoraConfig's target_modules): the fused head adds its low-rank update chunk by chunk, the
reference's head is read inside TRL's reference context (adapters disabled: the base lm_head; the "ref" adapter:
its own).

Packed sequences (`DPOConfig(padding_free=True)`, which TRL 1.16 accepts and ignores): the policy's and the
reference's decoders run each batch's sequences packed without padding, in rows no wider than the padded batch
under sdpa and eager, in one row under flash-attention (`loading.packed_row_tokens`; position ids restarting with each
sequence, no attention mask: transformers' packed-sequence masks keep attention within a sequence), and the fused
head, its statistics pass and the per-sequence sums read the hidden states where the packing put them; loss,
gradients and metrics are the padded batch's. A model `prefuse.engine.models.loading.check_packable` does not let
through is refused in one line.

Mixed precision (TRL's default bf16=True): the decoders run under accelerate's autocast, as in TRL; the fused head
then computes in the lm_head weight's dtype (float32 weights: a float32 head, where TRL's runs in bf16 under
autocast), so the two agree to bf16 accuracy, and exactly to float32 accuracy with bf16=False.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from prefuse.algorithms import get_objective
from prefuse.compat.sharding import check_not_zero3, full_head
from prefuse.engine.data.packing import PackedRows, pack_sequences
from prefuse.engine.models.loading import check_packable, packed_row_tokens
from prefuse.heads import causal_lm_of, head_of, mean_logit, reference_logps
from prefuse.kernels import linear_token_stats
from prefuse.preference import PreferenceLoss

IGNORE_INDEX = -100
NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
HIDDEN_FLAG = "prefuse_hidden_states"


def add_hidden_states_forward(causal_lm: torch.nn.Module) -> None:
    """Let `model(..., prefuse_hidden_states=True)` return the decoder's last hidden states [N, T, H], skipping the
    lm_head. Patched on the causal LM itself so that calls through PEFT, DDP or accelerate wrappers reach it; any
    forward patched before (TRL's fused head) serves the calls without the flag. Idempotent."""
    if getattr(causal_lm, "_prefuse_hidden_forward", False):
        return
    inner_forward = causal_lm.forward

    @functools.wraps(inner_forward)
    def forward(*args, prefuse_hidden_states=False, **kwargs):
        if not prefuse_hidden_states:
            return inner_forward(*args, **kwargs)
        # PEFT passes labels=None, return_dict=None, ...: the decoder needs none of them
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "labels"}
        return causal_lm.base_model(*args, **kwargs).last_hidden_state

    causal_lm.forward = forward
    causal_lm._prefuse_hidden_forward = True


class _NoTunerLayer:
    """Matches no module: stands in for peft's BaseTunerLayer in a TRL trainer's lm_head check."""


@contextlib.contextmanager
def lm_head_adapter_allowed(trainer_class: type):
    """Lift, while `trainer_class.__init__` runs, TRL 1.16's refusal of a PEFT adapter on the lm_head (its own fused
    head reads lm_head.weight and would skip the adapter; prefuse's head computes it: prefuse.heads.head_of, which
    refuses what it cannot compute). The check reads the module's BaseTunerLayer, swapped for the duration."""
    module = sys.modules[trainer_class.__module__]
    saved = getattr(module, "BaseTunerLayer", None)
    if saved is None:
        yield
        return
    module.BaseTunerLayer = _NoTunerLayer
    try:
        yield
    finally:
        module.BaseTunerLayer = saved


def next_token_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    """labels [N, T]: labels[:, t] is input_ids[:, t + 1] where that token is a completion token (the hidden state
    at t predicts it), IGNORE_INDEX elsewhere and at the last position."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)
    return torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)


class PrefuseDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` whose loss and metrics come from prefuse's `PreferenceLoss` on hidden states."""

    def __init__(self, *args, **kwargs):
        config = kwargs.get("args")
        padding_free = bool(getattr(config, "padding_free", False))
        if padding_free:  # TRL 1.16 would warn that it falls back to padding: prefuse packs instead
            config.padding_free = False
        try:
            with lm_head_adapter_allowed(DPOTrainer):
                super().__init__(*args, **kwargs)
        finally:
            if padding_free:
                config.padding_free = True
        self.padding_free = bool(self.args.padding_free)
        if self.padding_free:
            for model in (self.model, self.ref_model):
                if model is not None:
                    check_packable(self.accelerator.unwrap_model(model))
        if self.ld_alpha is not None and self.precompute_ref_logps:
            raise ValueError("ld_alpha: not supported with precompute_ref_log_probs by PrefuseDPOTrainer (the "
                             "reference's verbose part is not cached); compute the reference on the fly")
        if self.aux_loss_enabled:
            raise ValueError("router_aux_loss_coef: the MoE router aux loss is not supported by PrefuseDPOTrainer")
        if self._is_vision_dataset:
            raise ValueError("vision inputs are not supported by PrefuseDPOTrainer")
        check_not_zero3(self, "PrefuseDPOTrainer")
        trl_options = {"label_smoothing": self.args.label_smoothing, "discopop_tau": self.args.discopop_tau,
                       "ld_alpha": self.ld_alpha,
                       "f_divergence_type": self.args.f_divergence_type,
                       "f_alpha_divergence_coef": self.args.f_alpha_divergence_coef,
                       "use_weighting": self.use_weighting}
        accepted = set().union(*(get_objective(name).hparams for name in self.loss_types))
        # head_of refuses an lm_head the fused head cannot compute (a LoRA variant on it) before any step; its
        # softcap is Gemma-2's final-logit cap, which the model's own logits (TRL's) apply
        self.preference_loss = PreferenceLoss(self.loss_types, beta=self.beta, loss_weights=self.loss_weights,
                                              softcap=head_of(self.model).softcap,
                                              **{k: v for k, v in trl_options.items() if k in accepted})

    # -- the decoders ---------------------------------------------------------------------------------------------

    def _hidden_states(self, model, model_kwargs, seq_len):
        """The last hidden states [N, T, H] of `model` (policy or reference), without its lm_head, in the dtype of
        its lm_head weight. The flag is handled outside accelerate's forward wrapper, so its autocast (bf16/fp16
        mixed precision) is entered here, as TRL does for its reference pass."""
        causal_lm = causal_lm_of(self.accelerator.unwrap_model(model))
        add_hidden_states_forward(causal_lm)
        with self.accelerator.autocast():
            hidden = model(**model_kwargs, **{HIDDEN_FLAG: True})
        # prompt-learning PEFT prepends virtual tokens
        return hidden[:, -seq_len:].to(head_of(causal_lm).weight.dtype)

    def _reference_context(self):
        """TRL's reference under PEFT: the "ref" adapter when loaded, else the adapters disabled."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _reference_hidden_states(self, model_kwargs, seq_len):
        """-> (hidden [N, T, H], Head) of the reference, without gradient (the head read inside the reference's
        context: with the adapters disabled, the base lm_head)."""
        reference = self.ref_model if self.ref_model is not None else self.model
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_context():
            hidden = self._hidden_states(reference, model_kwargs, seq_len)
            return hidden, full_head(head_of(self.accelerator.unwrap_model(reference))).detached()

    @staticmethod
    def _model_inputs(inputs):
        model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        return model_kwargs, next_token_labels(inputs["input_ids"], inputs["completion_mask"])

    def _packed(self, model_kwargs) -> tuple[dict, PackedRows | None]:
        """With padding_free: the decoder's inputs with the batch's sequences packed (input_ids and position_ids
        [R, L], no attention mask), and the packing; else the inputs as they are and None."""
        if not self.padding_free:
            return model_kwargs, None
        input_ids = model_kwargs["input_ids"]
        packed = pack_sequences(input_ids, model_kwargs["attention_mask"],
                                row_tokens=packed_row_tokens(self.accelerator.unwrap_model(self.model),
                                                             input_ids.shape[1]))
        rest = {k: v for k, v in model_kwargs.items() if k not in ("input_ids", "attention_mask")}
        return {**rest, "input_ids": packed.input_ids, "position_ids": packed.position_ids}, packed

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-prob sums (chosen [B], rejected [B]) for precompute_ref_log_probs, through prefuse's head."""
        model_kwargs, labels = self._model_inputs(inputs)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                self._reference_context():
            hidden = self._hidden_states(model, model_kwargs, labels.shape[1])
            logps = reference_logps(hidden, full_head(head_of(self.accelerator.unwrap_model(model))), labels)
        return logps.chunk(2, dim=0)

    # -- the loss -------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs, labels = self._model_inputs(inputs)
        decoder_kwargs, packed = self._packed(model_kwargs)
        seq_len = decoder_kwargs["input_ids"].shape[1]
        hidden = self._hidden_states(model, decoder_kwargs, seq_len)
        head = full_head(head_of(self.accelerator.unwrap_model(model)))  # whole under FSDP2
        if self.precompute_ref_logps:
            reference = {"ref_chosen_logps": inputs["ref_chosen_logps"],
                         "ref_rejected_logps": inputs["ref_rejected_logps"]}
        else:
            ref_hidden, ref_head = self._reference_hidden_states(decoder_kwargs, seq_len)
            with torch.no_grad():
                reference = {"ref_hidden": ref_hidden, "ref_weight": ref_head.weight, "ref_bias": ref_head.bias,
                             "ref_low_rank": ref_head.low_rank(ref_hidden)}
        low_rank = head.low_rank(hidden)  # a LoRA adapter on the lm_head (one dropout draw for loss and metrics)
        seen = None if low_rank is None else tuple(t.detach() for t in low_rank)
        # the metrics' token statistics, and WPO's log sum_v p(v)^2 per token, from one forward-only pass
        stats = linear_token_stats(hidden.detach(), head.weight, labels if packed is None else packed.packed(
                                       labels, IGNORE_INDEX), bias=head.bias, softcap=head.softcap, top_k=1,
                                   low_rank=seen)
        stats = stats if packed is None else _padded_stats(stats, packed)  # the batch's [2B, T] layout
        if self.use_weighting:
            sums, pairs = stats.log_sum_sq_probs.sum(-1), labels.shape[0] // 2
            reference.update(policy_chosen_log_sum_sq_probs=sums[:pairs], policy_rejected_log_sum_sq_probs=sums[pairs:])
        loss, metrics = self.preference_loss(hidden, head.weight, labels, bias=head.bias,
                                             hidden_index=None if packed is None else packed.hidden_index,
                                             low_rank=low_rank,
                                             **reference)
        self._log_metrics(mode, metrics, hidden.detach(), head, labels, inputs, stats, seen, packed=packed)
        if return_outputs:  # TRL's deprecated path for compute_metrics, which wants logits: one plain forward
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    def _log_metrics(self, mode, metrics, hidden, head, labels, inputs, stats, low_rank=None, packed=None):
        """TRL's metrics: the loss's (rewards/*, logps/*), then entropy, logits/* and mean_token_accuracy from the
        forward-only pass of the fused head (`stats`), and the token count."""
        gather = self.accelerator.gather_for_metrics
        for name, value in metrics.items():
            self._metrics[mode][name].append(gather(value.reshape(1)).mean().item())
        with torch.no_grad():
            # a token's mean logit over the vocabulary, without logits (of the uncapped logits under a softcap)
            mean_logits = mean_logit(hidden, head.weight, head.bias, low_rank)
            if packed is not None:  # [1, N] -> the batch's [2B, T]
                mean_logits = packed.padded(mean_logits)
        mask = labels != IGNORE_INDEX
        pairs = labels.shape[0] // 2
        sums = {
            "entropy": (stats.entropy[mask].sum(), mask.sum()),
            "logits/chosen": (mean_logits[:pairs][mask[:pairs]].sum(), mask[:pairs].sum()),
            "logits/rejected": (mean_logits[pairs:][mask[pairs:]].sum(), mask[pairs:].sum()),
            "mean_token_accuracy": (stats.label_is_argmax[:pairs][mask[:pairs]].sum(), mask[:pairs].sum()),
        }
        for name, (total, count) in sums.items():  # token-weighted over all processes, as TRL
            total, count = gather(total.float().reshape(1)).sum(), gather(count.reshape(1)).sum()
            self._metrics[mode][name].append((total / count).item() if count > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(inputs["attention_mask"].sum().reshape(1)).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


def _padded_stats(stats, packed: PackedRows):
    """TokenStats of packed rows laid out as the padded batch's [2B, T] (0 / False past each sequence's end)."""
    tensors = {f.name: packed.padded(getattr(stats, f.name)) for f in dataclasses.fields(stats)
               if isinstance(getattr(stats, f.name), torch.Tensor)}
    return dataclasses.replace(stats, **tensors, extra_topk={k: packed.padded(v) for k, v in stats.extra_topk.items()})
