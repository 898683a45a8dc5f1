"""What the TRL drop-ins share: the decoder's hidden states and the lm_head the fused head reads, under any wrapper.

    hidden, head = hidden_and_head(accelerator, model, {"input_ids": ..., "attention_mask": ...})

The head is whole under FSDP2 too (`prefuse.compat.sharding.full_head`: a sharded weight is all-gathered, its gradient
reduce-scattered back into the shard).
"""
from __future__ import annotations

import torch

from prefuse.compat.sharding import full_head
from prefuse.compat.trl import HIDDEN_FLAG, IGNORE_INDEX, add_hidden_states_forward
from prefuse.heads import Head, causal_lm_of, head_of

__all__ = ["IGNORE_INDEX", "check_plain_logits", "hidden_and_head"]

# config fields by which some architectures scale their logits before the softmax; the fused head does not apply them
LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def hidden_and_head(accelerator, model: torch.nn.Module, model_kwargs: dict) -> tuple[torch.Tensor, Head]:
    """The last hidden states [N, T, H] of `model` (policy or reference, through its wrappers and under accelerate's
    autocast, as TRL runs its decoders) and its whole lm_head."""
    causal_lm = causal_lm_of(accelerator.unwrap_model(model))
    add_hidden_states_forward(causal_lm)
    with accelerator.autocast():
        hidden = model(**model_kwargs, use_cache=False, **{HIDDEN_FLAG: True})
    return hidden, full_head(head_of(causal_lm))


def check_plain_logits(model: torch.nn.Module, trainer: str) -> None:
    """Refuse, in one line, a model whose logits are scaled by a config field the fused head would not apply (and,
    through head_of, an lm_head that is not a plain Linear)."""
    if getattr(head_of(model), "lora", None) is not None:
        raise ValueError(f"lm_head: a LoRA adapter on it is not supported by {trainer} yet; leave lm_head out of "
                         f"target_modules")
    config = causal_lm_of(model).config.get_text_config()
    for name in LOGIT_SCALES:
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"{name}={value}: {trainer}'s fused head does not scale the logits; a model without "
                             f"{name} is needed")
