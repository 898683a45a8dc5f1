"""Head and reference helpers shared by the engine, the callers of `PreferenceLoss` and the compat front ends.

    head = head_of(model)                                        # lm_head weight [V, H], bias [V], softcap
    sums, counts = sequence_logps(hidden, head, labels)          # per-sequence sums [N] (differentiable), counts [N]
    ref_sums = reference_logps(ref_hidden, head, labels)         # the same without gradient
    mean_logits = mean_logit(hidden, head.weight, head.bias)     # per position [N, T], without logits

One way to compute log-probs in the whole project: every helper here goes through the fused head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefuse.kernels import linear_logprobs

__all__ = ["Head", "head_of", "causal_lm_of", "sequence_logps", "reference_logps", "mean_logit", "row_logits_sums"]


@dataclass
class Head:
    """What the fused head needs from a model: the output embedding weight [V, H] (tied or not), its bias [V]
    and Gemma-2's final-logit softcap."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    def detached(self) -> "Head":
        return Head(self.weight.detach(), None if self.bias is None else self.bias.detach(), self.softcap)


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a DDP/FSDP wrapper (`.module`) or a PeftModel, or the model itself."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_of(model: torch.nn.Module) -> Head:
    """The output embedding and logit transform of a causal LM (or of the one inside a wrapper)."""
    causal_lm = causal_lm_of(model)
    output = causal_lm.get_output_embeddings()
    if not isinstance(output, torch.nn.Linear):
        # e.g. LoRA on lm_head: the fused head would silently skip the adapter's update
        raise ValueError(f"the output embedding is a {type(output).__name__}, not a plain Linear; the fused head "
                         f"needs one: leave lm_head out of lora_target_modules")
    config = causal_lm.config.get_text_config()
    return Head(weight=output.weight, bias=output.bias, softcap=getattr(config, "final_logit_softcapping", None))


def sequence_logps(hidden: torch.Tensor, head: Head, labels: torch.Tensor, *, ignore_index: int = -100,
                   **head_options) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N, T, H], labels [N, T] -> (per-sequence log-prob sums [N] float32, differentiable; labeled-token
    counts [N]). head_options: the fused head's (backend, chunk_budget_bytes, temperature, ...)."""
    token_logps = linear_logprobs(hidden.to(head.weight.dtype), head.weight, labels, bias=head.bias,
                                  softcap=head.softcap, ignore_index=ignore_index, **head_options)
    return token_logps.sum(-1), (labels != ignore_index).sum(-1)


@torch.no_grad()
def reference_logps(hidden: torch.Tensor, head: Head, labels: torch.Tensor, *, ignore_index: int = -100,
                    **head_options) -> torch.Tensor:
    """The reference's per-sequence sums [N] (float32, no gradient) of hidden [N, T, H] through `head`."""
    sums, _ = sequence_logps(hidden.detach(), head.detached(), labels, ignore_index=ignore_index, **head_options)
    return sums


@torch.no_grad()
def mean_logit(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the vocabulary of each position's logits, [...] float32 for hidden [..., H], without logits:
    mean_v (h . w_v + b_v) = h . mean_v w_v + mean_v b_v."""
    column_mean = weight.float().mean(0)
    out = hidden.float() @ column_mean
    return out if bias is None else out + bias.float().mean()


@torch.no_grad()
def row_logits_sums(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of every logit of each row of hidden [N, T, H] @ weight.T + bias (all positions), float64 [N], without
    logits: sum_t sum_v (h_t . w_v + b_v) = (sum_t h_t) . (sum_v w_v) + T * sum_v b_v."""
    sums = hidden.sum(1, dtype=torch.float64) @ weight.sum(0, dtype=torch.float64)
    if bias is not None:
        sums = sums + hidden.shape[1] * bias.sum(dtype=torch.float64)
    return sums
