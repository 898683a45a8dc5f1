"""Liger-Kernel 0.8.5's fused linear preference losses, computed by prefuse: switch by changing one import.

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from prefuse.compat.liger import LigerFusedLinearDPOLoss

    dpo = LigerFusedLinearDPOLoss(beta=0.1)
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = dpo(lm_head.weight, hidden, labels, ref_input=ref_hidden)

Each class takes Liger's constructor arguments (names and defaults), its forward arguments in Liger's order, and
returns Liger's tuple: the loss, then the same outputs in the same order, shapes and meaning. Inside, each class is
a `PreferenceLoss` (`.preference_loss`) over registered objectives, so the in-forward mode (the head's gradients
formed in forward, one matmul fewer) is taken whenever the objectives are separable; the output tuples are built
from the per-example statistics the objective saw (`return_inputs=True`).

How Liger's options map onto registered objectives (rows: chosen [0, B), rejected [B, 2B)):
- DPO: the objective named by loss_type ("ipo" too, see the class); with average_log_prob, "sigmoid" becomes
  "sigmoid_norm" (DPO on per-token log-ratios: the same loss), "ipo" is unchanged (it normalizes by length itself).
  Without a reference model the reference log-probs are zeros. In-forward.
- CPO: "cpo" with loss_type="sigmoid" on sums, or loss_type="simpo" with simpo_gamma=0 on per-token means
  (average_log_prob), and cpo_alpha = alpha for the NLL. `cpo` is registered non-separable: recompute mode.
- SimPO: "simpo" (simpo_gamma = gamma). In-forward.
- ORPO: "orpo" minus "sft" (loss_weights [1, -1]): prefuse's orpo always includes the NLL of the chosen responses,
  which is `sft` exactly, so the difference is the odds-ratio term alone; Liger's optional NLL is added as below.
  `orpo` is non-separable: recompute mode.
- KTO: "apo_zero_unpaired" (role "completion": every row, labels = preference_labels) on the log-ratios shifted by
  Liger's given reference point kl: the reference log-probs are precomputed (`prefuse.heads.reference_logps`, or
  zeros without a reference model) plus kl. prefuse's `kto` computes its own point (clamped at 0) from KL
  completions instead, so it is not the map. In-forward.
- Liger's NLL term alpha * NLL(chosen) (compute_nll_loss; DPO, SimPO, ORPO) is the objective "wbc" (reward-weighted
  behaviour cloning, -w * logp) on the role "completion" = the chosen rows, with the constant weight
  w = B / (labeled tokens of those rows): its batch mean is the token-mean NLL exactly, and, unlike `sft`, it is
  separable (the token count is known before the forward), so it keeps the in-forward mode. ORPO's nll_target
  appends the chosen rows once more with those labels and reads the NLL there.

Not mapped, with a fallback for that option only: average_log_prob=True for the DPO loss types other than sigmoid
and ipo, and for KTO. Liger's objective then sees per-token mean log-probs of policy and reference, and no
registered objective takes them (a per-example length divides beta). The fallback computes the per-sequence sums
through prefuse's fused head (`prefuse.heads.sequence_logps`, recompute mode), divides them by the token counts and
calls the same objective (`prefuse.objective_loss`). The class's `fallback` attribute is True then.

Other differences, on purpose:
- `compiled` and `chunk_size` are accepted and ignored: prefuse chunks over tokens from a memory budget, not over
  pairs, so one long pair cannot blow the budget. `PreferenceLoss`'s options (`backend`, `mode`,
  `chunk_budget_bytes`, `grad_budget_bytes`, `temperature`, `softcap`, `accumulate_fp32`) can be passed as extra
  keywords.
- The logits means are formed without logits: the sum of a row's logits is `hidden . weight.sum(0) + bias.sum()`.
- With average_log_prob (and in SimPO, ORPO), a response without labeled tokens averages to 0 (Liger gives NaN);
  an NLL over no tokens is 0.
- `LigerFusedLinearDPOLoss` also takes loss_type="ipo" (length-normalized, as TRL): see the class.
- With `use_ref_model=True` and no `ref_weight`, the reference uses the policy's head (as `PreferenceLoss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefuse.algorithms import get_objective, objective_loss
from prefuse.algorithms.common import batch_token_mean_nll, per_token_mean
from prefuse.algorithms.roles import input_name
from prefuse.heads import Head, reference_logps, row_logits_sums, sequence_logps
from prefuse.preference import PreferenceLoss

__all__ = [
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearKTOLoss",
]

NLL = "wbc"  # the objective that carries Liger's NLL term (see the module docstring)


def preference_loss(objectives, weights, *, beta, ignore_index, nll_alpha=None, hparams=None,
                    head_options=None) -> PreferenceLoss:
    """The PreferenceLoss of a class: `objectives` weighted `weights`, plus the NLL objective weighted nll_alpha when
    nll_alpha is not None; only the hyper-parameters the objectives read are passed (Liger ignores the others)."""
    names, weights = list(objectives), list(weights)
    if nll_alpha is not None:
        names, weights = names + [NLL], weights + [nll_alpha]
    accepted = set().union(*(get_objective(name).hparams for name in names))
    hparams = {k: v for k, v in (hparams or {}).items() if k in accepted}
    return PreferenceLoss(names, beta=beta, loss_weights=weights, ignore_index=ignore_index, **hparams,
                          **(head_options or {}))


@dataclass
class Rows:
    """What one call hands to PreferenceLoss: hidden [S, T, H], labels [S, T], roles, extra inputs, and the NLL's
    labeled-token count (0-d; None without the NLL term)."""

    hidden: torch.Tensor
    labels: torch.Tensor
    roles: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    nll_tokens: torch.Tensor | None = None


def paired_rows(hidden, target, ignore_index, nll: bool, nll_target=None) -> Rows:
    """Roles chosen [0, B) and rejected [B, 2B) of hidden [2B, T, H]; with `nll`, the role "completion" holds the
    NLL's rows (the chosen rows, or with nll_target [2B, T] those rows again, appended, with its chosen labels) and
    `rewards` the NLL's constant weight B / tokens, so that wbc's mean is the token-mean NLL."""
    n_pairs = hidden.shape[0] // 2
    device = hidden.device
    chosen = torch.arange(n_pairs, device=device)
    rows = Rows(hidden, target, {"chosen": chosen, "rejected": chosen + n_pairs}, {})
    if not nll:
        return rows
    nll_rows = chosen
    if nll_target is not None:
        rows.hidden = torch.cat([hidden, hidden[:n_pairs]])
        rows.labels = torch.cat([target, nll_target[:n_pairs].to(target.dtype)])
        nll_rows = chosen + 2 * n_pairs
    rows.roles["completion"] = nll_rows
    rows.nll_tokens = (rows.labels[nll_rows] != ignore_index).sum()
    weight = n_pairs / rows.nll_tokens.clamp(min=1).float()  # on the device, no host sync
    rows.inputs["rewards"] = weight.expand(n_pairs).contiguous()
    return rows


def fused_head_options(loss_fn: PreferenceLoss) -> dict:
    """loss_fn's options that the plain fused head (`prefuse.heads`) takes too."""
    return dict(ignore_index=loss_fn.ignore_index, temperature=loss_fn.temperature, backend=loss_fn.backend,
                chunk_size=loss_fn.chunk_size, chunk_budget_bytes=loss_fn.chunk_budget_bytes,
                accumulate_fp32=loss_fn.accumulate_fp32)


def reference_head(weight, bias, ref_weight, ref_bias, softcap) -> Head:
    """The reference's head: ref_weight / ref_bias, or the policy's when no ref_weight (as PreferenceLoss)."""
    if ref_weight is None:
        return Head(weight, bias if ref_bias is None else ref_bias, softcap)
    return Head(ref_weight, ref_bias, softcap)


def per_token_mean_loss(loss_fn: PreferenceLoss, rows: Rows, weight, bias, averaged, *, ref_hidden=None,
                        ref_weight=None, ref_bias=None):
    """The fallback for average_log_prob where no registered objective takes per-token means: loss_fn's objective
    on the per-token means of the roles in `averaged` (policy, and the reference when ref_hidden is given; inputs
    given in rows.inputs pass unchanged), with the sums from prefuse's fused head in recompute mode.
    -> (loss, inputs: sums and lengths, detached, as PreferenceLoss's return_inputs gives them)."""
    head_options = fused_head_options(loss_fn)
    sums, counts = sequence_logps(rows.hidden, Head(weight, bias, loss_fn.softcap), rows.labels, **head_options)
    sources = {"policy": sums}
    if ref_hidden is not None:
        ref_head = reference_head(weight, bias, ref_weight, ref_bias, loss_fn.softcap)
        sources["ref"] = reference_logps(ref_hidden, ref_head, rows.labels, **head_options)
    seen, reported = dict(rows.inputs), dict(rows.inputs)
    for role, index in rows.roles.items():
        lengths = counts[index]
        seen[input_name(role, "lengths")] = reported[input_name(role, "lengths")] = lengths
        for source, values in sources.items():
            name = input_name(role, "logps", source)
            reported[name] = values[index]
            seen[name] = per_token_mean(values[index], lengths) if role in averaged else values[index]
    loss, _ = objective_loss(loss_fn.names, beta=loss_fn.beta, loss_weights=loss_fn.loss_weights, **loss_fn.hparams,
                             **{k: v for k, v in seen.items() if k in loss_fn.inputs})
    return loss, {k: v.detach() for k, v in reported.items()}


def side_logps(inputs, source: str, average: bool) -> torch.Tensor:
    """chosen then rejected log-probs [2B] of `source` from the objective's inputs: sums, or per-token means."""
    values = torch.cat([inputs[f"{source}_chosen_logps"], inputs[f"{source}_rejected_logps"]])
    if not average:
        return values
    return per_token_mean(values, torch.cat([inputs["chosen_lengths"], inputs["rejected_lengths"]]))


def nll_value(inputs, rows: Rows, like: torch.Tensor) -> torch.Tensor:
    """Liger's nll_loss output: the token-mean NLL of the NLL rows (0 without the term or without tokens)."""
    if rows.nll_tokens is None:
        return torch.zeros((), device=like.device)
    return -inputs["policy_logps"].sum() / rows.nll_tokens.clamp(min=1)


def paired_outputs(loss, logps, hidden, weight, bias, nll, rewards, *extra):
    """Liger's paired output tuple: (loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean,
    rejected_logits_mean, nll_loss, chosen_rewards [B], rejected_rewards [B], *extra)); logps and rewards [2B]."""
    n_pairs = hidden.shape[0] // 2
    # Liger divides each side's logits sum by pairs x positions x vocabulary
    row_sums = row_logits_sums(hidden, weight, bias) / (n_pairs * hidden.shape[1] * weight.shape[0])
    chosen_logits_mean, rejected_logits_mean = row_sums[:n_pairs].sum().float(), row_sums[n_pairs:].sum().float()
    logps, rewards = logps.detach(), rewards.detach()
    aux = (logps[:n_pairs], logps[n_pairs:], chosen_logits_mean, rejected_logits_mean, nll.detach(),
           rewards[:n_pairs], rewards[n_pairs:], *(t.detach() for t in extra))
    return loss, aux


def _check_pairs(hidden, target):
    if hidden.dim() != 3 or hidden.shape[0] % 2 or target.shape != hidden.shape[:2]:
        raise ValueError(f"_input: expected [2B, T, H] (chosen rows, then rejected) with target [2B, T], got "
                         f"{tuple(hidden.shape)} and {tuple(target.shape)}")


class LigerFusedLinearDPOLoss(torch.nn.Module):
    """DPO family (Liger's loss types, plus "ipo") on the fused head.

    forward(lin_weight [V, H], _input [2B, T, H], target [2B, T], bias=None, ref_input=None, ref_weight=None,
    ref_bias=None) -> (loss, (chosen_logps [B], rejected_logps [B], chosen_logits_mean, rejected_logits_mean,
    nll_loss, chosen_rewards [B], rejected_rewards [B])); rewards = beta * (logps - ref_logps).

    loss_type="ipo" is TRL's length-normalized IPO: mean((h_c/len_c - h_r/len_r - 1/(2 beta))^2) with h the summed
    log-ratio and len the response token count, whatever `average_log_prob` is (it only changes the reported
    log-probs and rewards).
    """

    _SUPPORTED_LOSS_TYPES = {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                             "apo_zero", "apo_down", "discopop"}

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, discopop_tau: float = 0.05, **head_options):
        super().__init__()
        if loss_type not in self._SUPPORTED_LOSS_TYPES:
            raise ValueError(f"loss_type: {loss_type!r} is not one of {sorted(self._SUPPORTED_LOSS_TYPES)}")
        if loss_type == "exo_pair" and label_smoothing <= 0.0:
            raise ValueError("label_smoothing: loss_type='exo_pair' needs label_smoothing > 0 (the paper uses 1e-3)")
        if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing: loss_type='robust' needs it in [0, 0.5), got {label_smoothing}")
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau
        # ipo normalizes by length itself: it reads sums whatever average_log_prob is
        objective = "sigmoid_norm" if average_log_prob and loss_type == "sigmoid" else loss_type
        self.fallback = average_log_prob and objective not in ("sigmoid_norm", "ipo")
        self.preference_loss = preference_loss(
            [objective], [1.0], beta=beta, ignore_index=ignore_index, nll_alpha=alpha if compute_nll_loss else None,
            hparams={"label_smoothing": label_smoothing, "discopop_tau": discopop_tau}, head_options=head_options)

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        _check_pairs(_input, target)
        rows = paired_rows(_input, target, self.ignore_index, self.compute_nll_loss)
        if not self.use_ref_model:
            zeros = torch.zeros(target.shape[0] // 2, device=_input.device)
            rows.inputs.update(ref_chosen_logps=zeros, ref_rejected_logps=zeros)
            reference = {}
        elif ref_input is None:
            raise ValueError("ref_input: use_ref_model=True needs the reference model's hidden states")
        else:
            reference = {"ref_hidden": ref_input, "ref_weight": ref_weight, "ref_bias": ref_bias}
        if self.fallback:
            loss, inputs = per_token_mean_loss(self.preference_loss, rows, lin_weight, bias, ("chosen", "rejected"),
                                               **reference)
        else:
            loss, _, inputs = self.preference_loss(rows.hidden, lin_weight, rows.labels, roles=rows.roles, bias=bias,
                                                   return_inputs=True, **reference, **rows.inputs)
        logps = side_logps(inputs, "policy", self.average_log_prob)
        rewards = self.beta * (logps - side_logps(inputs, "ref", self.average_log_prob))
        return paired_outputs(loss, logps, _input, lin_weight, bias, nll_value(inputs, rows, _input), rewards)


class LigerFusedLinearCPOLoss(torch.nn.Module):
    """CPO (sigmoid, with label smoothing) plus alpha * NLL of the chosen responses, no reference.

    forward(lin_weight, _input [2B, T, H], target [2B, T], bias=None) -> (loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards)); rewards = beta * logps.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, **head_options):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.average_log_prob = compute_nll_loss, compiled, average_log_prob
        self.chunk_size = chunk_size
        # cpo's loss_type "simpo" is its sigmoid on per-token means (minus simpo_gamma / beta, here 0); its NLL reads
        # the sums whatever the loss type, as Liger's
        self.preference_loss = preference_loss(
            ["cpo"], [1.0], beta=beta, ignore_index=ignore_index, head_options=head_options,
            hparams={"loss_type": "simpo" if average_log_prob else "sigmoid", "simpo_gamma": 0.0,
                     "cpo_alpha": alpha if compute_nll_loss else 0.0, "label_smoothing": label_smoothing})

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        rows = paired_rows(_input, target, self.ignore_index, nll=False)
        loss, _, inputs = self.preference_loss(_input, lin_weight, target, roles=rows.roles, bias=bias,
                                               return_inputs=True)
        nll = (batch_token_mean_nll(inputs["policy_chosen_logps"], inputs["chosen_lengths"]) if self.compute_nll_loss
               else torch.zeros((), device=_input.device))
        logps = side_logps(inputs, "policy", self.average_log_prob)
        return paired_outputs(loss, logps, _input, lin_weight, bias, nll, self.beta * logps)


class LigerFusedLinearSimPOLoss(torch.nn.Module):
    """SimPO: -logsigmoid(beta * (avg_c - avg_r) - gamma) (label smoothing optional) plus alpha * NLL.

    forward(lin_weight, _input [2B, T, H], target [2B, T], bias=None) -> (loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards)); the log-probs are
    per-token means, rewards = beta * logps.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1,
                 **head_options):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled, self.gamma = compute_nll_loss, compiled, gamma
        self.chunk_size = chunk_size
        self.preference_loss = preference_loss(
            ["simpo"], [1.0], beta=beta, ignore_index=ignore_index, nll_alpha=alpha if compute_nll_loss else None,
            hparams={"simpo_gamma": gamma, "label_smoothing": label_smoothing}, head_options=head_options)

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        rows = paired_rows(_input, target, self.ignore_index, self.compute_nll_loss)
        loss, _, inputs = self.preference_loss(_input, lin_weight, target, roles=rows.roles, bias=bias,
                                               return_inputs=True, **rows.inputs)
        logps = side_logps(inputs, "policy", average=True)
        return paired_outputs(loss, logps, _input, lin_weight, bias, nll_value(inputs, rows, _input),
                              self.beta * logps)


class LigerFusedLinearORPOLoss(torch.nn.Module):
    """ORPO: NLL(chosen) - beta * mean(logsigmoid(log odds(avg_c) - log odds(avg_r))), no reference.

    forward(lin_weight, _input [2B, T, H], target [2B, T], bias=None, nll_target=None) -> (loss, (chosen_logps,
    rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards, rejected_rewards,
    log_odds_ratio, log_odds_chosen)); the log-probs are per-token means, rewards = beta * logps.
    nll_target [2B, T] (its chosen rows are read): other labels for the NLL term, e.g. with the prompt included.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, **head_options):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size
        # orpo - sft: the odds-ratio term alone (orpo's own NLL is sft's); Liger's NLL weighs 1
        self.preference_loss = preference_loss(["orpo", "sft"], [1.0, -1.0], beta=beta, ignore_index=ignore_index,
                                               nll_alpha=1.0 if compute_nll_loss else None, head_options=head_options)

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        _check_pairs(_input, target)
        rows = paired_rows(_input, target, self.ignore_index, self.compute_nll_loss, nll_target)
        loss, metrics, inputs = self.preference_loss(rows.hidden, lin_weight, rows.labels, roles=rows.roles,
                                                     bias=bias, return_inputs=True, **rows.inputs)
        logps = side_logps(inputs, "policy", average=True)
        return paired_outputs(loss, logps, _input, lin_weight, bias, nll_value(inputs, rows, _input),
                              self.beta * logps, metrics["log_odds_ratio"], metrics["log_odds_chosen"])


class LigerFusedLinearKTOLoss(torch.nn.Module):
    """KTO on unpaired examples: desirable 1 - sigmoid(beta (h - kl)), undesirable 1 - sigmoid(beta (kl - h)),
    h = log-ratio (the log-prob itself without a reference), averaged over the examples.

    forward(_input [N, T, H], lin_weight [V, H], target [N, T], bias=None, preference_labels [N] bool,
    ref_input=None, ref_weight=None, ref_bias=None, kl=None (0-d, the reference point; None for 0)) ->
    (loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum, chosen_rewards_sum,
    rejected_rewards_sum)), all 0-d sums over the desirable / undesirable examples; rewards = beta * h.
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True,
                 use_ref_model: bool = False, average_log_prob: bool = False, chunk_size: int = 1, **head_options):
        super().__init__()
        self.ignore_index, self.beta, self.compiled = ignore_index, beta, compiled
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob
        self.chunk_size = chunk_size
        self.fallback = average_log_prob
        self.preference_loss = preference_loss(["apo_zero_unpaired"], [1.0], beta=beta, ignore_index=ignore_index,
                                               head_options=head_options)

    def _reference(self, ref_input, ref_weight, ref_bias, weight, bias, target):
        """The reference's log-probs [N] as the objective reads them (sums, or per-token means), no gradient."""
        if not self.use_ref_model:
            return torch.zeros(target.shape[0], device=target.device)
        if ref_input is None:
            raise ValueError("ref_input: use_ref_model=True needs the reference model's hidden states")
        head = reference_head(weight, bias, ref_weight, ref_bias, self.preference_loss.softcap)
        ref = reference_logps(ref_input, head, target, **fused_head_options(self.preference_loss))
        return per_token_mean(ref, (target != self.ignore_index).sum(-1)) if self.average_log_prob else ref

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
                ref_weight=None, ref_bias=None, kl=None):
        if preference_labels is None:
            raise ValueError("preference_labels: KTO needs a bool [N] marking the desirable examples")
        desirable = preference_labels.bool().to(_input.device)
        ref = self._reference(ref_input, ref_weight, ref_bias, lin_weight, bias, target)
        # the given reference point shifts the reference: h - kl = logps - (ref + kl)
        shifted_ref = ref if kl is None else ref + torch.as_tensor(kl).detach().to(ref)
        rows = Rows(_input, target, {"completion": torch.arange(target.shape[0], device=_input.device)},
                    {"labels": desirable, "ref_logps": shifted_ref})
        if self.fallback:
            loss, inputs = per_token_mean_loss(self.preference_loss, rows, lin_weight, bias, ("completion",))
        else:
            loss, _, inputs = self.preference_loss(_input, lin_weight, target, roles=rows.roles, bias=bias,
                                                   return_inputs=True, **rows.inputs)
        logps = inputs["policy_logps"]
        if self.average_log_prob:
            logps = per_token_mean(logps, (target != self.ignore_index).sum(-1))
        rewards = self.beta * (logps - ref)
        logits_sums = row_logits_sums(_input, lin_weight, bias)
        aux = tuple(value[side].sum().float() for value in (logps, logits_sums, rewards)
                    for side in (desirable, ~desirable))
        return loss, aux
