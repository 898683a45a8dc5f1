"""Head and reference helpers shared by the engine, the callers of `PreferenceLoss` and the compat front ends.

    head = head_of(model)                                        # lm_head weight [V, H], bias [V], softcap, LoRA
    sums, counts = sequence_logps(hidden, head, labels)          # per-sequence sums [N] (differentiable), counts [N]
    ref_sums = reference_logps(ref_hidden, head, labels)         # the same without gradient
    mean_logits = mean_logit(hidden, head.weight, head.bias, head.low_rank(hidden))   # per position [N, T]

One way to compute log-probs in the whole project: every helper here goes through the fused head. A LoRA adapter
on the lm_head (peft's `lora.Linear` around it) travels with the Head: `head.low_rank(hidden)` is the fused head's
`low_rank` argument (u = scale * dropout(hidden) A^T, B), which every caller of the head passes; `head.base()` is
the head with the adapter disabled (LoRA's reference).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from prefuse.kernels import linear_logprobs

__all__ = ["Head", "HeadLoRA", "causal_lm_of", "head_of", "mean_logit", "reference_logps", "row_logits_sums",
           "sequence_logps"]


@dataclass
class HeadLoRA:
    """A LoRA adapter on the lm_head: logits += scale * dropout(h) A^T B^T, with a [r, H] and b [V, r] (peft's
    lora_A / lora_B weights of the active adapter), scale (its scaling) and dropout (its lora_dropout module, applied
    as peft applies it: an identity in eval mode or with p = 0)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None

    def detached(self) -> HeadLoRA:
        return HeadLoRA(self.a.detach(), self.b.detach(), self.scale, self.dropout)


@dataclass
class Head:
    """What the fused head needs from a model: the output embedding weight [V, H] (tied or not), its bias [V],
    Gemma-2's final-logit softcap and a LoRA adapter on it (None without)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    lora: HeadLoRA | None = None

    def detached(self) -> Head:
        return Head(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.softcap,
                    None if self.lora is None else self.lora.detached())

    def base(self) -> Head:
        """The head with its LoRA adapter disabled: the base lm_head alone (LoRA's reference model)."""
        return replace(self, lora=None)

    def low_rank(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fused head's `low_rank` argument for hidden [..., H]: (u [..., r] = scale * dropout(hidden) A^T,
        B [V, r]) in the weight's dtype, differentiable with respect to hidden, A and B; None without LoRA."""
        if self.lora is None:
            return None
        lora = self.lora
        x = hidden.to(lora.a.dtype)
        if lora.dropout is not None:
            x = lora.dropout(x)
        u = (x @ lora.a.t()) * lora.scale
        return u.to(self.weight.dtype), lora.b.to(self.weight.dtype)


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a DDP/FSDP wrapper (`.module`) or a PeftModel, or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_of(model: torch.nn.Module) -> Head:
    """The output embedding and logit transform of a causal LM (or of the one inside a wrapper), with the active
    LoRA adapter when the lm_head is peft's LoRA Linear (none while the adapters are disabled)."""
    causal_lm = causal_lm_of(model)
    output = causal_lm.get_output_embeddings()
    lora = None
    if hasattr(output, "lora_A") and hasattr(output, "get_base_layer"):  # peft's LoRA layer around the lm_head
        output, lora = _lora_of(output)
    if not isinstance(output, torch.nn.Linear):
        raise ValueError(f"the output embedding is a {type(output).__name__}, not a Linear (or peft's LoRA Linear "
                         f"around one); the fused head needs one: leave lm_head out of modules_to_save and other "
                         f"adapters")
    config = causal_lm.config.get_text_config()
    return Head(weight=output.weight, bias=output.bias, softcap=getattr(config, "final_logit_softcapping", None),
                lora=lora)


def _lora_of(layer: torch.nn.Module) -> tuple[torch.nn.Module, HeadLoRA | None]:
    """(the base Linear, its active adapter) of peft's LoRA layer around the lm_head; a one-line ValueError for what
    the fused head does not compute (a merged adapter, several active ones, DoRA and other variants, lora_bias)."""
    from peft.tuners.lora import Linear as LoraLinear

    base = layer.get_base_layer()
    if not isinstance(layer, LoraLinear):
        raise ValueError(f"lm_head: peft's {type(layer).__name__} is not its LoRA Linear; the fused head takes plain "
                         f"LoRA on the lm_head")
    if layer.disable_adapters:  # inside disable_adapter(): the base model
        return base, None
    if layer.merged:
        raise ValueError("lm_head: its LoRA adapter is merged into the weight; unmerge it (unmerge_adapter()) "
                         "before training through the fused head")
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if not active:
        return base, None
    if len(active) > 1:
        raise ValueError(f"lm_head: {len(active)} active LoRA adapters {active}; the fused head takes one "
                         f"(set_adapter one of them)")
    name = active[0]
    if layer.use_dora.get(name) or name in getattr(layer, "lora_variant", {}):
        raise ValueError(f"lm_head: adapter {name!r} is a LoRA variant (DoRA or another); the fused head takes "
                         f"plain LoRA on the lm_head")
    if layer.lora_B[name].bias is not None:
        raise ValueError(f"lm_head: adapter {name!r} has lora_bias; the fused head takes LoRA without it")
    return base, HeadLoRA(a=layer.lora_A[name].weight, b=layer.lora_B[name].weight, scale=layer.scaling[name],
                          dropout=layer.lora_dropout[name])


def sequence_logps(hidden: torch.Tensor, head: Head, labels: torch.Tensor, *, ignore_index: int = -100,
                   **head_options) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, T, H], labels [N, T] -> (per-sequence log-prob sums [N] float32, differentiable; labeled-token
    counts [N]). head_options: the fused head's (backend, chunk_budget_bytes, temperature, ...). A LoRA adapter on
    the lm_head goes in as the head's low-rank update."""
    hidden = hidden.to(head.weight.dtype)
    token_logps = linear_logprobs(hidden, head.weight, labels, bias=head.bias, softcap=head.softcap,
                                  ignore_index=ignore_index, low_rank=head.low_rank(hidden), **head_options)
    return token_logps.sum(-1), (labels != ignore_index).sum(-1)


@torch.no_grad()
def reference_logps(hidden: torch.Tensor, head: Head, labels: torch.Tensor, *, ignore_index: int = -100,
                    **head_options) -> torch.Tensor:
    """The reference's per-sequence sums [N] (float32, no gradient) of hidden [N, T, H] through `head`."""
    sums, _ = sequence_logps(hidden.detach(), head.detached(), labels, ignore_index=ignore_index, **head_options)
    return sums


@torch.no_grad()
def mean_logit(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The mean over the vocabulary of each position's logits, [...] float32 for hidden [..., H], without logits:
    mean_v (h . w_v + b_v) = h . mean_v w_v + mean_v b_v; with low_rank (u [..., r], B [V, r]: the logits' update
    u B^T, `Head.low_rank`) + u . mean_v B_v."""
    column_mean = weight.float().mean(0)
    out = hidden.float() @ column_mean
    if low_rank is not None:
        u, factor = low_rank
        out = out + u.float() @ factor.float().mean(0)
    return out if bias is None else out + bias.float().mean()


@torch.no_grad()
def row_logits_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of every logit of each row of hidden [N, T, H] @ weight.T + bias (all positions), float64 [N], without
    logits: sum_t sum_v (h_t . w_v + b_v) = (sum_t h_t) . (sum_v w_v) + T * sum_v b_v."""
    sums = hidden.sum(1, dtype=torch.float64) @ weight.sum(0, dtype=torch.float64)
    if bias is not None:
        sums = sums + hidden.shape[1] * bias.sum(dtype=torch.float64)
    return sums
