"""`PreferenceLoss`: the fused preference loss over sequence roles, the one that other trainers drop in.

    loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, lm_head.weight, labels, ref_hidden=ref_hidden)
    loss, metrics = PreferenceLoss("selm", alpha=1e-3)(hidden, weight, labels, ref_hidden=ref_hidden,
                                                      roles={"chosen": c, "rejected": r, "sample": s})

hidden [S, T, H] -> fused head (every row once, no [S, T, V] logits) -> per-token log-probs -> for each role the
objective declares (`prefuse.algorithms.roles`): sums, counts and token-level values under the policy and, without
gradient, the reference -> objective -> (loss, metrics).

Two modes, chosen from the objective and the chunk budget (overridable with `mode`):
- "in_forward": when every objective is separable by example (example i's loss depends only on its own
  sequences), the rows are grouped example by example (`kernels.group_rows`), and as soon as a chunk's log-probs
  are known the objective's gradient with respect to them is taken on that chunk's examples and the head's
  gradients are formed in the same pass (one matmul fewer). The value and metrics come from the objective on the
  whole batch.
- "recompute": per-token log-probs with a recomputing backward, then the objective under autograd. Works for every
  objective (batch-level ones such as KTO's KL point, `aot`'s sorting) and for extra inputs that carry gradients.
- "frozen_weight": when only hidden needs a gradient (LoRA, a frozen lm_head), for every objective: the head forms
  each row's gradient basis in forward and backward scales it by the objective's gradient (two matmuls per chunk,
  as in_forward, without its separability condition). "auto" takes it whenever the weight and bias are frozen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from prefuse.algorithms import get_objective, objective_loss
from prefuse.algorithms.common import verbose_token_mask
from prefuse.algorithms.roles import PARTNER, RoleInput, role_inputs
from prefuse.batch_gather import gather_examples
from prefuse.kernels import RowGroups, group_rows, grouped_logprobs, grouped_logprobs_shared
from prefuse.kernels.low_rank import LowRank
from prefuse.kernels.plan import MODES
from prefuse.kernels.validate import check_head_inputs, check_transform


def default_roles(n_sequences: int, device=None) -> dict[str, torch.Tensor]:
    """The first half of the rows is `chosen`, the second `rejected`: {"chosen": [0, B), "rejected": [B, 2B)}."""
    if n_sequences % 2:
        raise ValueError(f"hidden: without roles, expected [2B, T, H] (chosen rows, then rejected), got "
                         f"{n_sequences} rows")
    half = n_sequences // 2
    return {"chosen": torch.arange(half, device=device), "rejected": torch.arange(half, 2 * half, device=device)}


@dataclass
class RoleBatch:
    """The roles of one call: index per role (rows of hidden, [B] or [P, k]), the number of examples B when every
    role shares its leading size (else None), and each sequence's example [S] (-1 for unread sequences) when no
    sequence belongs to two examples (else None: the call cannot be grouped)."""

    index: dict[str, torch.Tensor]
    n_examples: int | None
    sequence_example: torch.Tensor | None
    sequence_read: torch.Tensor  # [S] bool


def _role_batch(roles: Mapping[str, torch.Tensor], n_seq: int, device) -> RoleBatch:
    index = {}
    for role, value in roles.items():
        value = torch.as_tensor(value, device=device)
        if value.dtype not in (torch.int64, torch.int32) or value.dim() < 1:
            raise ValueError(f"roles[{role!r}]: expected an integer tensor of row indices [B] or [P, k], got "
                             f"{value.dtype} {tuple(value.shape)}")
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= n_seq):
            raise ValueError(f"roles[{role!r}]: row indices must lie in [0, {n_seq}) (the rows of hidden)")
        index[role] = value.long()
    sizes = {value.shape[0] for value in index.values()}
    n_examples = sizes.pop() if len(sizes) == 1 else None
    read = torch.zeros(n_seq, dtype=torch.bool, device=device)
    for value in index.values():
        read[value.reshape(-1)] = True
    example = None
    if n_examples is not None:
        pairs = torch.cat([torch.stack([value.reshape(-1), torch.arange(n_examples, device=device).view(
            -1, *([1] * (value.dim() - 1))).expand_as(value).reshape(-1)]) for value in index.values()], 1)
        sequences, owners = pairs.unique(dim=1)
        if sequences.unique().numel() == sequences.numel():  # else a sequence read by two examples couples them
            example = torch.full((n_seq,), -1, dtype=torch.long, device=device)
            example[sequences] = owners
    return RoleBatch(index, n_examples, example, read)


class RoleStatistics:
    """Role statistics from per-row log-probs: `values(logp, source, examples)` -> {input name: tensor}.

    rows: the RowGroups of the call; labels [S, T]; stats: the RoleInputs to produce (those of roles present)."""

    def __init__(self, rows: RowGroups, labels: torch.Tensor, roles: RoleBatch, stats: list[RoleInput],
                 ignore_index: int):
        self.rows, self.roles, self.stats = rows, roles, stats
        self.mask = labels != ignore_index  # [S, T]
        self.counts = self.mask.sum(-1)     # [S]

    def values(self, logp: torch.Tensor, source: str, examples: slice = slice(None),
               rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """logp [m]: the log-probs of `rows` (a slice of the call's rows) under `source` ("policy" or "ref");
        differentiable with respect to logp. examples: the examples whose statistics to return."""
        n_seq, seq_len = self.rows.shape
        wanted = [s for s in self.stats if s.source == source]
        out: dict[str, torch.Tensor] = {}
        if not wanted:
            return out
        sums = tokens = None
        if any(s.stat == "logps" for s in wanted):
            sums = torch.zeros(n_seq, dtype=torch.float32, device=logp.device).index_add(
                0, self.rows.sequence[rows], logp)
        if any(s.stat in ("token_logps", "verbose_logps") for s in wanted):
            tokens = torch.zeros(n_seq * seq_len, dtype=torch.float32, device=logp.device).index_put(
                (self.rows.index[rows],), logp).view(n_seq, seq_len)
        for stat in wanted:
            index = self.roles.index[stat.role][examples]
            if stat.stat == "verbose_logps":
                out[stat.name] = self.verbose_sums(tokens, stat.role, examples)
            else:
                out[stat.name] = sums[index] if stat.stat == "logps" else tokens[index]
        return out

    def verbose_sums(self, tokens: torch.Tensor, role: str, examples: slice) -> torch.Tensor:
        """LD-DPO: the sum of a role's token log-probs past its pair's shared length min(len, partner's len).
        tokens [S, T] -> [B]."""
        index = self.roles.index[role][examples]
        shared = torch.minimum(self.counts[index], self.counts[self.roles.index[PARTNER[role]][examples]])
        verbose = verbose_token_mask(self.mask[index], shared)
        picked = tokens[index]
        return torch.where(verbose, picked, torch.zeros_like(picked)).sum(-1)

    def wpo_values(self, log_sum_sq: torch.Tensor, roles: list[str], examples: slice = slice(None),
                   rows: slice = slice(None)) -> dict[str, torch.Tensor]:
        """WPO's policy_<role>_log_sum_sq_probs of `examples`: log_sum_sq [m], each of the rows `rows`' log sum_v
        p(v)^2, summed over each role's sequence (no gradient)."""
        n_seq = self.rows.shape[0]
        sums = torch.zeros(n_seq, dtype=torch.float32, device=log_sum_sq.device).index_add(
            0, self.rows.sequence[rows], log_sum_sq.detach())
        return {f"policy_{role}_log_sum_sq_probs": sums[self.roles.index[role][examples]] for role in roles}

    def shapes(self, examples: slice = slice(None)) -> dict[str, torch.Tensor]:
        """The lengths and token masks of the roles (no source)."""
        out = {}
        for stat in self.stats:
            index = self.roles.index[stat.role][examples]
            if stat.stat == "lengths":
                out[stat.name] = self.counts[index]
            elif stat.stat == "token_mask":
                out[stat.name] = self.mask[index]
        return out


class PreferenceLoss(torch.nn.Module):
    """loss, metrics = PreferenceLoss("sigmoid", beta=0.1)(hidden, lm_head.weight, labels, ref_hidden=...)

    objective: a registered objective name (see `prefuse.list_objectives()`) or a list of names combined with
    `loss_weights` (MPO style). Other keyword arguments are the objectives' hyper-parameters; head options:
    ignore_index, temperature (a float; a call may pass its own, also one per sequence or token), softcap,
    backend, mode ("auto" | "in_forward" | "recompute" | "frozen_weight"), chunk_size, chunk_budget_bytes,
    grad_budget_bytes, accumulate_fp32, share_reference_chunks (default True: a reference given with the policy's
    own frozen lm_head, LoRA's, goes through the policy's chunks on the frozen-weight path; False: its own pass).
    """

    def __init__(self, objective: str | Sequence[str] = "sigmoid", *, beta: float = 0.1,
                 loss_weights: Sequence[float] | None = None, ignore_index: int = -100, temperature: float = 1.0,
                 softcap: float | None = None, backend: str = "auto", mode: str = "auto",
                 chunk_size: int | None = None, chunk_budget_bytes: int | None = None,
                 grad_budget_bytes: int | None = None, accumulate_fp32: bool = True,
                 share_reference_chunks: bool = True, **hparams):
        super().__init__()
        self.names = [objective] if isinstance(objective, str) else list(objective)
        self.specs = [get_objective(n) for n in self.names]  # ValueError listing the names for an unknown one
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {MODES}")
        check_transform(temperature, softcap)
        accepted = set().union(*(spec.hparams for spec in self.specs))
        unknown = sorted(set(hparams) - accepted)
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {unknown} for {self.names}; accepted: "
                             + "; ".join(spec.accepts() for spec in self.specs))
        self.beta, self.loss_weights, self.hparams = beta, loss_weights, hparams
        self.ignore_index, self.temperature, self.softcap = ignore_index, temperature, softcap
        self.backend, self.mode = backend, mode
        self.chunk_size, self.chunk_budget_bytes, self.grad_budget_bytes = (chunk_size, chunk_budget_bytes,
                                                                            grad_budget_bytes)
        self.accumulate_fp32, self.share_reference_chunks = accumulate_fp32, share_reference_chunks
        self.role_inputs = role_inputs(self.specs)
        self.inputs = set().union(*(spec.inputs for spec in self.specs))
        self.last_mode: str | None = None  # the mode the latest forward used
        self.last_shared = False  # whether the latest forward ran the reference through the policy's chunks
        # the process group over which each batch is sharded by examples (data-parallel training): objectives
        # coupled across the batch (not separable) then see the whole batch (engine/train/distributed.py)
        self.batch_group = None

    @property
    def separable(self) -> bool:
        return all(spec.separable for spec in self.specs)

    @property
    def roles(self) -> list[str]:
        """The roles the objectives read (required or optional)."""
        return sorted({s.role for s in self.role_inputs})

    @property
    def reads_reference(self) -> bool:
        return any(s.source == "ref" for s in self.role_inputs)

    def _objective(self, inputs: dict) -> tuple[torch.Tensor, dict]:
        return objective_loss(self.names if len(self.names) > 1 else self.names[0], beta=self.beta,
                              loss_weights=self.loss_weights, **self.hparams, **inputs)

    def _check_inputs(self, roles: RoleBatch, inputs: dict, has_ref_hidden: bool) -> list[RoleInput]:
        """The role statistics to compute; ValueError for an unknown input or role, or a required one missing."""
        unknown = sorted(set(inputs) - self.inputs)
        if unknown:
            raise ValueError(f"unknown input(s) {unknown} for {self.names}; accepted: "
                             + "; ".join(spec.accepts() for spec in self.specs))
        unread = sorted(set(roles.index) - set(self.roles))
        if unread:
            raise ValueError(f"roles: {unread} not read by {self.names}; they read the roles {self.roles}")
        wanted = []
        for stat in self.role_inputs:
            if stat.name in inputs:  # given by the caller (precomputed reference, another adapter's sums)
                continue
            present = stat.role in roles.index and (stat.stat != "verbose_logps" or PARTNER[stat.role] in roles.index)
            if present and (stat.source != "ref" or has_ref_hidden):
                wanted.append(stat)
            elif stat.required:
                how = (f"roles={{{stat.role!r}: row indices}}" if stat.role not in roles.index
                       else "ref_hidden (the reference's hidden states)")
                raise ValueError(f"{stat.name}: {self.names} need it; pass {how} or {stat.name}=...")
        return wanted

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, /, *,
                roles: Mapping[str, torch.Tensor] | None = None, bias: torch.Tensor | None = None,
                ref_hidden: torch.Tensor | None = None, ref_weight: torch.Tensor | None = None,
                ref_bias: torch.Tensor | None = None, hidden_index: torch.Tensor | None = None,
                low_rank: LowRank | None = None, ref_low_rank: LowRank | None = None,
                temperature: float | torch.Tensor | None = None, return_inputs: bool = False, **inputs):
        """hidden [S, T, H]: the policy's last hidden states; weight [V, H] and bias [V]: the lm_head; labels
        [S, T] with ignore_index on prompt and padding. roles: {role: row indices into hidden, [B] (or [P, k] for
        k samples per prompt)}; default: the first half of the rows `chosen`, the second `rejected`.
        The reference: ref_hidden [S, T, H] with ref_weight / ref_bias (default: the policy's head), through the
        fused head without gradient, or precomputed `ref_<role>_logps`. Packed sequences (padding-free): hidden
        (and ref_hidden) [R, L, H] hold the sequences several to a row, and hidden_index [S, T] says where each
        position of labels' [S, T] has its hidden state among the R * L (-1: padding, no label); roles, sums, token
        values and the objective stay keyed by sequence, equal to the padded call's. Other keyword tensors are the
        objectives' inputs, passed through (preference_probs, advantages, rewards, use_offline, ...; [B] per example).
        low_rank: LoRA on the lm_head, (u [S, T, r] = scale * dropout(hidden) A^T, B [V, r]) added to the policy's
        logits as u B^T (`prefuse.heads.Head.low_rank`; gradients to u and B; the in-forward or recompute path,
        not the frozen-weight one); ref_low_rank the same for the reference's head (default none: the reference
        is ref_weight, or the policy's weight alone, LoRA's adapters disabled).
        temperature: this call's (default: the module's), a float or one value per sequence [S] or per token
        [S, T] of labels (e.g. each sample's sampling temperature), for the policy and the reference alike.
        hidden, weight and labels are positional: a `labels=` keyword is the objective's input of that name (KTO's
        desirable flags [B]). Returns (loss: 0-d, metrics: dict of 0-d tensors named as TRL names them), and with
        return_inputs also the objective's inputs (detached: policy_chosen_logps [B], chosen_lengths, ...)."""
        self._check_call(hidden, weight, labels, bias, ref_hidden, inputs, hidden_index)
        for name, ref, policy in (("ref_weight", ref_weight, weight), ("ref_bias", ref_bias, bias)):
            if ref is not None and policy is not None and ref.shape != policy.shape:
                # one vocabulary for both models' labels (a shard of a sharded lm_head would pass silently)
                raise ValueError(f"{name}: shape {tuple(ref.shape)} must equal the policy's {tuple(policy.shape)}; "
                                 f"pass the reference's whole lm_head (under FSDP2 gathered, not its shard)")
        temperature = self.temperature if temperature is None else temperature
        check_transform(temperature, self.softcap, labels.shape)
        head = self._head_options(temperature)
        if low_rank is not None and self.mode == "frozen_weight":
            raise ValueError(f"mode: {self.mode!r} takes no low_rank (LoRA on the lm_head: its factor's gradient "
                             f"needs the recompute path); use mode='auto' or 'recompute'")
        n_seq = labels.shape[0]  # the sequences (hidden's rows unless packed)
        role_batch = _role_batch(default_roles(n_seq, hidden.device) if roles is None else roles, n_seq,
                                 hidden.device)
        wanted = self._check_inputs(role_batch, inputs, ref_hidden is not None)
        needs_grad = any(torch.is_grad_enabled() and t is not None and t.requires_grad
                         for t in (hidden, weight, bias, *(low_rank or ())))
        rows = self._group_rows(hidden, weight, bias, labels, role_batch, inputs, needs_grad, hidden_index,
                                low_rank is not None)
        stats = RoleStatistics(rows, labels, role_batch, wanted, self.ignore_index)
        fixed = {**inputs, **stats.shapes()}
        wpo = self._wpo_roles(role_batch, inputs)
        # WPO's per-row log sum_v p(v)^2, written by the policy's own log-prob pass (no pass of its own)
        log_sum_sq = torch.zeros(rows.n_rows, dtype=torch.float32, device=hidden.device) if wpo else None
        shared_logp = None
        if ref_hidden is not None and any(s.source == "ref" for s in wanted):
            shared_logp, ref_logp = self._reference_logp(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows,
                                                         needs_grad, ref_low_rank, head, log_sum_sq)
            fixed.update(stats.values(ref_logp, "ref"))
        self.last_shared = shared_logp is not None
        if needs_grad and rows.in_forward:
            loss, metrics, objective_inputs = self._in_forward_loss(hidden, weight, bias, rows, stats, fixed,
                                                                    role_batch.n_examples, head, wpo, log_sum_sq,
                                                                    low_rank)
        else:
            loss, metrics, objective_inputs = self._autograd_loss(hidden, weight, bias, rows, stats, fixed,
                                                                  role_batch.n_examples, needs_grad, shared_logp,
                                                                  low_rank, head, wpo, log_sum_sq)
        if return_inputs:
            detached = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in objective_inputs.items()}
            return loss, metrics, detached
        return loss, metrics

    def _check_call(self, hidden, weight, labels, bias, ref_hidden, inputs: dict, hidden_index) -> None:
        """ValueError for head inputs of the wrong shapes, or a reference the objectives do not read or given
        twice (its hidden states and its precomputed sums)."""
        if hidden.dim() != 3:
            raise ValueError(f"hidden: expected [S, T, H] (packed: [R, L, H]), got {tuple(hidden.shape)}")
        # packed: labels keep the sequences' layout [S, T]; a view of hidden in that shape checks the rest
        check_head_inputs(hidden if hidden_index is None else hidden[:1, :1].expand(*labels.shape, hidden.shape[-1]),
                          weight, labels, bias, ignore_index=self.ignore_index)
        if hidden_index is None and ref_hidden is not None and ref_hidden.shape[:2] != labels.shape:
            raise ValueError(f"ref_hidden: leading shape {tuple(ref_hidden.shape[:2])} must equal labels' "
                             f"{tuple(labels.shape)}")
        if hidden_index is not None and ref_hidden is not None and ref_hidden.shape[:2] != hidden.shape[:2]:
            raise ValueError(f"ref_hidden: packed, its leading shape {tuple(ref_hidden.shape[:2])} must equal "
                             f"hidden's {tuple(hidden.shape[:2])} (the same packing)")
        given_ref = [k for k in inputs if k.startswith("ref_") and k.endswith("logps")]
        if (ref_hidden is not None or given_ref) and not self.reads_reference:
            raise ValueError(f"ref_hidden / ref_*_logps: {self.names} use no reference model; drop them")
        if ref_hidden is not None and given_ref:
            raise ValueError(f"ref_hidden: pass either ref_hidden or precomputed {given_ref}, not both")

    def _group_rows(self, hidden, weight, bias, labels, role_batch: RoleBatch, inputs: dict,
                    needs_grad: bool, hidden_index: torch.Tensor | None = None, low_rank: bool = False) -> RowGroups:
        """The call's rows and plan: grouped example by example (the in-forward mode) when the objectives are
        separable, no extra input carries a gradient and no sequence belongs to two examples; else one group of
        the sequences some role reads. A low-rank update (LoRA on the lm_head) never takes the frozen-weight plan."""
        frozen = bool(torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
                      and (bias is None or not bias.requires_grad)) and not low_rank
        grad_inputs = any(isinstance(v, torch.Tensor) and v.requires_grad for v in inputs.values())
        groupable = self.separable and not grad_inputs and role_batch.sequence_example is not None
        if needs_grad and self.mode == "in_forward" and not groupable:
            raise ValueError(
                f"mode: 'in_forward' needs separable objectives (got {self.names}, separable={self.separable}), "
                f"extra inputs without gradient and no sequence shared by two examples; use mode='auto'")
        sequence_group = (role_batch.sequence_example if groupable
                          else torch.where(role_batch.sequence_read, 0, -1))
        return group_rows(labels, sequence_group, vocab=weight.shape[0], hidden_size=hidden.shape[-1],
                          dtype=hidden.dtype, needs_grad=needs_grad, grouped=groupable,
                          ignore_index=self.ignore_index, mode=self.mode, chunk_size=self.chunk_size,
                          chunk_budget_bytes=self.chunk_budget_bytes, grad_budget_bytes=self.grad_budget_bytes,
                          weight_frozen=frozen, hidden_index=hidden_index)

    def _wpo_roles(self, role_batch: RoleBatch, inputs: dict) -> list[str]:
        """WPO (`use_weighting=True`, TRL's name) needs policy_<role>_log_sum_sq_probs [B] of the chosen and
        rejected responses: the sum over each response's tokens of log sum_v p(v)^2 under the policy, without
        gradient (TRL 1.16 detaches the weight). The roles it is to be computed for (none that the caller gave)."""
        if not self.hparams.get("use_weighting"):
            return []
        return [role for role in ("chosen", "rejected")
                if f"policy_{role}_log_sum_sq_probs" not in inputs and role in role_batch.index]

    def _head_options(self, temperature) -> dict:
        return dict(temperature=temperature, softcap=self.softcap, backend=self.backend,
                    accumulate_fp32=self.accumulate_fp32)

    def _reference_logp(self, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, rows: RowGroups,
                        needs_grad: bool, ref_low_rank: LowRank | None, head: dict,
                        log_sum_sq: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the policy's log-probs [M] when they came from the same pass, else None; the reference's [M], without
        gradient). The reference goes through the same rows, chunks and reductions as the policy, so that a policy
        equal to its reference gives rewards of exactly 0; its head defaults to the policy's. log_sum_sq [M]:
        filled with the policy's rows' log sum p^2 when the policy's log-probs come from this pass."""
        ref_weight, ref_bias = (weight, bias if ref_bias is None else ref_bias) if ref_weight is None else (
            ref_weight, ref_bias)
        if (self.share_reference_chunks and rows.frozen_weight and needs_grad and ref_low_rank is None
                and _same_tensor(ref_weight, weight) and _same_tensor(ref_bias, bias)):
            # one lm_head (LoRA): each chunk's logits matmul reads it once for both models' rows
            return grouped_logprobs_shared(hidden, ref_hidden, weight, rows, bias=bias, log_sum_sq_out=log_sum_sq,
                                           **head)
        with torch.no_grad():
            return None, grouped_logprobs(ref_hidden.detach(), ref_weight.detach(), rows,
                                          bias=None if ref_bias is None else ref_bias.detach(),
                                          low_rank=None if ref_low_rank is None else tuple(
                                              t.detach() for t in ref_low_rank), **head)

    def _autograd_loss(self, hidden, weight, bias, rows: RowGroups, stats: RoleStatistics, fixed: dict,
                       n_examples: int | None, needs_grad: bool, shared_logp: torch.Tensor | None,
                       low_rank: LowRank | None, head: dict, wpo: list[str], log_sum_sq: torch.Tensor | None):
        """(loss, metrics, the objective's inputs): the policy's log-probs (those of the shared pass when given)
        with a recomputing or frozen-weight backward, then the objective under autograd; forward only without
        gradient. log_sum_sq: WPO's per-row term, from the shared pass or filled by this one."""
        self.last_mode = ("frozen_weight" if rows.frozen_weight else "recompute") if needs_grad else "forward_only"
        logp = shared_logp if shared_logp is not None else grouped_logprobs(
            hidden, weight, rows, bias=bias, low_rank=low_rank, log_sum_sq_out=log_sum_sq, **head)
        objective_inputs = {**fixed, **stats.values(logp, "policy")}
        if log_sum_sq is not None:
            objective_inputs.update(stats.wpo_values(log_sum_sq, wpo))
        loss, metrics = self._objective(self._whole_batch(objective_inputs, n_examples))
        return loss, metrics, objective_inputs

    def _in_forward_loss(self, hidden, weight, bias, rows: RowGroups, stats: RoleStatistics, fixed: dict,
                         n_examples: int, head: dict, wpo: list[str], log_sum_sq: torch.Tensor | None,
                         low_rank: LowRank | None = None):
        """(loss, metrics, the objective's inputs) with the head's gradients formed in forward, chunk by chunk:
        the loss's value is the objective's on the whole batch, its gradient the surrogate's. log_sum_sq: WPO's
        per-row term, each chunk's rows written by the head before the chunk's coefficients read them."""
        self.last_mode = "in_forward"
        coef_fn = self._chunk_gradient(rows, stats, fixed, n_examples, wpo, log_sum_sq)
        surrogate, logp = grouped_logprobs(hidden, weight, rows, bias=bias, coef_fn=coef_fn, log_sum_sq_out=log_sum_sq,
                                           low_rank=low_rank, **head)
        objective_inputs = {**fixed, **stats.values(logp, "policy")}
        if log_sum_sq is not None:
            objective_inputs.update(stats.wpo_values(log_sum_sq, wpo))
        with torch.no_grad():
            loss, metrics = self._objective(objective_inputs)
        loss = loss.detach().float() + (surrogate - surrogate.detach())
        return loss, metrics, objective_inputs

    def _whole_batch(self, inputs: dict, n_examples: int | None) -> dict:
        """The objective's inputs over the whole batch when it is sharded over `batch_group` and an objective is
        coupled across examples: each rank's loss is then the whole batch's mean (gradients flow back to every
        rank's own rows through the all-gather); separable objectives need only their own examples."""
        if self.batch_group is None or self.separable:
            return inputs
        if n_examples is None:
            raise ValueError(f"{self.names} couple the examples of a batch, and roles of different leading sizes "
                             f"cannot be gathered over the ranks")
        return gather_examples(inputs, n_examples, self.batch_group)

    def _chunk_gradient(self, rows: RowGroups, stats: RoleStatistics, fixed: dict, n_examples: int,
                        wpo: list[str], log_sum_sq: torch.Tensor | None):
        """coef_fn for grouped_logprobs: the batch loss's gradient with respect to one chunk's log-probs, from the
        objective on the chunk's own examples (their share of the batch mean; WPO's terms from log_sum_sq's rows
        of the chunk)."""

        def per_example(value, examples: slice):
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n_examples:
                return value[examples]
            return value

        def coef_fn(chunk: slice, logp: torch.Tensor) -> torch.Tensor:
            groups = rows.group[chunk]
            examples = slice(int(groups[0]), int(groups[-1]) + 1)  # whole examples, in order
            with torch.enable_grad():
                local = logp.detach().clone().requires_grad_()
                inputs = {k: per_example(v, examples) for k, v in fixed.items()}
                inputs.update(stats.values(local, "policy", examples, chunk))
                if log_sum_sq is not None:
                    inputs.update(stats.wpo_values(log_sum_sq[chunk], wpo, examples, chunk))
                loss, _ = self._objective(inputs)
                share = (examples.stop - examples.start) / n_examples
                (grad,) = torch.autograd.grad(loss * share, [local], allow_unused=True)
            return torch.zeros_like(logp) if grad is None else grad.float()

        return coef_fn


__all__ = ["PreferenceLoss", "default_roles", "RoleStatistics"]


def _same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether a and b are the same values in memory (a parameter and its detached view), or both None."""
    if a is None or b is None:
        return a is None and b is None
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)
