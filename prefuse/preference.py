"""`PreferenceLoss`: the fused preference loss that other trainers drop in.

hidden states -> fused head -> per-token log-probs -> per-sequence sums -> objective -> (loss, metrics), without
the [2B, T, V] logits of the policy or the reference.

Two modes, chosen from the objective and the chunk budget (overridable with `mode`):
- "in_forward": when every objective is separable (pair i's loss depends only on pair i) and each pair fits in a
  chunk, rows are grouped by pair, and as soon as a chunk's log-probs are known the objective's gradient with
  respect to them is taken on that chunk's pairs and the head's gradients are formed in the same pass (one matmul
  fewer). The value and metrics come from the objective on the whole batch, on the detached sums.
- "recompute": per-token log-probs with a recomputing backward, then the objective under autograd. Works for every
  objective (batch-level ones such as KTO's KL point, `aot`'s sorting) and for extra inputs that carry gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from prefuse.algorithms import get_objective, objective_loss
from prefuse.kernels import linear_logprobs
from prefuse.kernels.api import _config, _needs_grad
from prefuse.kernels.fused_head import FusedHeadInForward, FusedLogprobs
from prefuse.kernels.plan import MODES, make_plan
from prefuse.kernels.rows import select_labeled_rows
from prefuse.kernels.validate import check_head_inputs, check_transform, resolve_backend


@dataclass
class PairLayout:
    """The labeled rows regrouped pair by pair for the in-forward mode.

    index [M] (rows of the flattened hidden [2B * T, H]) and labels [M]: pair 0's chosen then rejected tokens,
    then pair 1's, ...; sequence [M]: each row's sequence index in [0, 2B); chunks: slices of whole pairs."""

    index: torch.Tensor
    labels: torch.Tensor
    sequence: torch.Tensor
    chunks: list[slice]
    plan: object


class PreferenceLoss(torch.nn.Module):
    """loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, lm_head.weight, labels, ref_hidden=...)

    objective: a registered objective name (see `prefuse.list_objectives()`) or a list of names combined with
    `loss_weights` (MPO style). Other keyword arguments are the objectives' hyper-parameters; head options:
    ignore_index, temperature, softcap, backend, mode ("auto" | "in_forward" | "recompute"), chunk_size,
    chunk_budget_bytes, grad_budget_bytes, accumulate_fp32.
    """

    def __init__(self, objective: str | Sequence[str] = "sigmoid", *, beta: float = 0.1,
                 loss_weights: Sequence[float] | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", mode: str = "auto",
                 chunk_size: int | None = None, chunk_budget_bytes: int | None = None,
                 grad_budget_bytes: int | None = None, accumulate_fp32: bool = True, **hparams):
        super().__init__()
        self.names = [objective] if isinstance(objective, str) else list(objective)
        self.specs = [get_objective(n) for n in self.names]  # ValueError listing the names for an unknown one
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        check_transform(temperature, softcap)
        accepted = set().union(*(spec.hparams for spec in self.specs)) | set().union(*(s.inputs for s in self.specs))
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {unknown} for {self.names}; accepted: "
                             + "; ".join(spec.accepts() for spec in self.specs))
        self.beta, self.loss_weights, self.hparams = beta, loss_weights, hparams
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.mode = backend, mode
        self.chunk_size, self.chunk_budget_bytes, self.grad_budget_bytes = (chunk_size, chunk_budget_bytes,
                                                                            grad_budget_bytes)
        self.accumulate_fp32 = accumulate_fp32
        self.last_mode: str | None = None  # the mode the latest forward used

    @property
    def separable(self) -> bool:
        return all(spec.separable for spec in self.specs)

    def _objective(self, chosen, rejected, ref_chosen, ref_rejected, counts, inputs):
        batch = chosen.shape[0]
        return objective_loss(
            self.names if len(self.names) > 1 else self.names[0], policy_chosen_logps=chosen,
            policy_rejected_logps=rejected, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
            chosen_lengths=counts[:batch], rejected_lengths=counts[batch:], beta=self.beta,
            loss_weights=self.loss_weights, **self.hparams, **inputs)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                bias: torch.Tensor | None = None, ref_chosen_logps: torch.Tensor | None = None,
                ref_rejected_logps: torch.Tensor | None = None, ref_hidden: torch.Tensor | None = None,
                ref_weight: torch.Tensor | None = None, ref_bias: torch.Tensor | None = None, **inputs):
        """hidden [2B, T, H]: the policy's last hidden states, chosen rows first, then rejected; weight [V, H] and
        bias [V]: the lm_head; labels [2B, T] with ignore_index on prompt and padding.
        The reference: ref_chosen_logps and ref_rejected_logps [B] (precomputed sums), or ref_hidden [2B, T, H]
        with ref_weight / ref_bias (default: the policy's head), run through the fused head without gradient.
        Other keyword tensors are the objectives' extra inputs, [B] per pair (or as the objective documents).
        Returns (loss: 0-d, metrics: dict of 0-d tensors named as TRL names them)."""
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(f"hidden: expected [2B, T, H] (chosen rows, then rejected), got {tuple(hidden.shape)}")
        check_head_inputs(hidden, weight, labels, bias, ignore_index=self.ignore_index)
        batch = hidden.shape[0] // 2
        counts = (labels != self.ignore_index).sum(-1)
        has_ref = ref_hidden is not None or ref_chosen_logps is not None or ref_rejected_logps is not None
        if has_ref and not any("ref_chosen_logps" in spec.inputs for spec in self.specs):
            raise ValueError(f"ref_hidden / ref_*_logps: {self.names} use no reference model; drop them")
        head = dict(ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
                    backend=self.backend, chunk_size=self.chunk_size, chunk_budget_bytes=self.chunk_budget_bytes)
        needs = _needs_grad(hidden, weight, bias)
        grad_inputs = any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values())
        layout = None
        if any(needs) and self.mode != "recompute" and self.separable and not grad_inputs:
            layout = self._pair_layout(hidden, weight, labels, batch)
        if layout is None and any(needs) and self.mode == "in_forward":
            raise ValueError(
                f"mode: 'in_forward' needs separable objectives (got {self.names}, separable={self.separable}), "
                f"extra inputs without gradient, and every pair within one chunk and the gradient buffers within "
                f"grad_budget_bytes; use mode='auto' to fall back to recompute")
        # the reference goes through the same rows, chunks and reductions as the policy, so that a policy equal
        # to its reference gives rewards of exactly 0
        ref_chosen, ref_rejected = self._reference(ref_chosen_logps, ref_rejected_logps, ref_hidden, ref_weight,
                                                   ref_bias, weight, bias, labels, batch, head, layout)
        if layout is None:
            self.last_mode = "recompute" if any(needs) else "forward_only"
            token_logps = linear_logprobs(hidden, weight, labels, bias=bias,
                                          accumulate_fp32=self.accumulate_fp32, **head)
            seq = token_logps.sum(-1)
            return self._objective(seq[:batch], seq[batch:], ref_chosen, ref_rejected, counts, inputs)
        self.last_mode = "in_forward"
        return self._in_forward(layout, hidden, weight, bias, batch, counts, ref_chosen, ref_rejected, inputs,
                                needs)

    def _reference(self, ref_chosen, ref_rejected, ref_hidden, ref_weight, ref_bias, weight, bias, labels, batch,
                   head, layout: PairLayout | None):
        if ref_hidden is None:
            if (ref_chosen is None) != (ref_rejected is None):
                raise ValueError("ref_chosen_logps and ref_rejected_logps: pass both or neither")
            return ref_chosen, ref_rejected
        if ref_chosen is not None or ref_rejected is not None:
            raise ValueError("ref_hidden: pass either ref_hidden or ref_chosen_logps/ref_rejected_logps, not both")
        if ref_hidden.shape[:2] != labels.shape:
            raise ValueError(f"ref_hidden: leading shape {tuple(ref_hidden.shape[:2])} must equal labels' "
                             f"{tuple(labels.shape)}")
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        ref_bias = None if ref_bias is None else ref_bias.detach()
        with torch.no_grad():
            if layout is None:
                seq = linear_logprobs(ref_hidden.detach(), ref_weight.detach(), labels, bias=ref_bias,
                                      **head).sum(-1)
            else:
                flat = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
                token_logps = FusedLogprobs.apply(flat, ref_weight.detach(), ref_bias, layout.labels, layout.index,
                                                  self._head_config(layout, hidden=ref_hidden), layout.chunks)
                seq = self._sequence_sums(layout, token_logps, 2 * batch)
        return seq[:batch], seq[batch:]

    def _head_config(self, layout: PairLayout, hidden: torch.Tensor):
        return _config(layout.plan, resolve_backend(self.backend, hidden.device), self.temperature, self.softcap,
                       False, self.accumulate_fp32, None)

    @staticmethod
    def _sequence_sums(layout: PairLayout, token_logps: torch.Tensor, n_seq: int) -> torch.Tensor:
        """token_logps [M] in the layout's row order -> per-sequence sums [2B]."""
        return torch.zeros(n_seq, dtype=torch.float32, device=token_logps.device).index_add_(
            0, layout.sequence, token_logps)

    def _pair_layout(self, hidden, weight, labels, batch) -> PairLayout | None:
        """Labeled rows ordered pair by pair (chosen then rejected), and chunks of whole pairs within the chunk
        budget; None when a pair alone exceeds it or the gradient buffers exceed the grad budget."""
        rows = select_labeled_rows(hidden, labels, self.ignore_index)
        n_rows = rows.n_rows
        plan = make_plan(n_rows=n_rows, hidden_size=hidden.shape[-1], vocab=weight.shape[0], dtype=hidden.dtype,
                         device=hidden.device, needs_grad=True, upstream_known=True, mode=self.mode,
                         chunk_size=self.chunk_size, chunk_budget_bytes=self.chunk_budget_bytes,
                         grad_budget_bytes=self.grad_budget_bytes)
        if plan.mode != "in_forward" or n_rows == 0:
            return None
        seq_len = labels.shape[1]
        flat_index = rows.index if rows.index is not None else torch.arange(n_rows, device=labels.device)
        sequence = torch.div(flat_index, seq_len, rounding_mode="floor")
        pair = sequence % batch
        order = torch.sort(pair, stable=True).indices  # pair by pair; chosen rows precede rejected ones
        pair_rows = torch.bincount(pair, minlength=batch).tolist()
        chunks, start, size = [], 0, 0
        for count in pair_rows:
            if count > plan.rows_per_chunk:
                return None
            if size + count > plan.rows_per_chunk:
                chunks.append(slice(start, start + size))
                start, size = start + size, 0
            size += count
        if size:
            chunks.append(slice(start, start + size))
        return PairLayout(flat_index[order], rows.labels[order], sequence[order], chunks, plan)

    def _in_forward(self, layout: PairLayout, hidden, weight, bias, batch, counts, ref_chosen, ref_rejected,
                    inputs, needs):
        sequence = layout.sequence
        n_seq = 2 * batch

        def per_pair(value, pairs):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
                return value[pairs]
            return value

        def coef_fn(chunk, logp, _mean_logp):
            seq_ids = sequence[chunk]
            first, last = int(seq_ids.min()) % batch, int(seq_ids.max()) % batch
            pairs = torch.arange(first, last + 1, device=logp.device)
            local = torch.zeros(n_seq, dtype=torch.float32, device=logp.device).index_add_(0, seq_ids, logp)
            with torch.enable_grad():
                chosen = local[pairs].clone().requires_grad_()
                rejected = local[pairs + batch].clone().requires_grad_()
                loss, _ = self._objective(
                    chosen, rejected, None if ref_chosen is None else ref_chosen[pairs],
                    None if ref_rejected is None else ref_rejected[pairs],
                    torch.cat([counts[pairs], counts[pairs + batch]]),
                    {k: per_pair(v, pairs) for k, v in inputs.items()})
                # the batch loss is the mean over all pairs; this chunk's pairs carry len(pairs) / B of it
                g_chosen, g_rejected = torch.autograd.grad(loss * (len(pairs) / batch), [chosen, rejected])
            seq_grad = torch.zeros(n_seq, dtype=torch.float32, device=logp.device)
            seq_grad[pairs], seq_grad[pairs + batch] = g_chosen.float(), g_rejected.float()
            return seq_grad[seq_ids], None

        cfg = self._head_config(layout, hidden)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        surrogate, token_logps, _ = FusedHeadInForward.apply(flat_hidden, weight, bias, layout.labels,
                                                             layout.index, cfg, coef_fn, needs, layout.chunks)
        seq = self._sequence_sums(layout, token_logps, n_seq)
        with torch.no_grad():
            loss, metrics = self._objective(seq[:batch], seq[batch:], ref_chosen, ref_rejected, counts, inputs)
        # value of the objective, gradient formed in forward (the surrogate's gradient is the objective's)
        return loss.detach().float() + (surrogate - surrogate.detach()), metrics
