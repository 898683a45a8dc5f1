"""Liger-Kernel 0.8.5's fused linear preference losses, computed by prefuse: switch by changing one import.

    # from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    from prefuse.compat.liger import LigerFusedLinearDPOLoss

    dpo = LigerFusedLinearDPOLoss(beta=0.1)
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = dpo(lm_head.weight, hidden, labels, ref_input=ref_hidden)

Each class takes Liger's constructor arguments (names and defaults), its forward arguments in Liger's order, and
returns Liger's tuple: the loss, then the same outputs in the same order, shapes and meaning. Inside, the per-token
log-probs come from `prefuse.linear_logprobs` (chunked over tokens, no [tokens x vocab] logits kept) and the
preference term from `prefuse.objective_loss`. Differences, on purpose:
- `compiled` and `chunk_size` are accepted and ignored: prefuse chunks over tokens from a memory budget, not over
  pairs, so one long pair cannot blow the budget. Head options (`backend`, `chunk_budget_bytes`, `temperature`,
  `softcap`) can be passed as extra keywords.
- The logits means are formed without logits: the sum of a row's logits is `hidden . weight.sum(0) + bias.sum()`.
- With `average_log_prob`, a response without labeled tokens averages to 0 (Liger gives NaN).
- `LigerFusedLinearDPOLoss` also takes loss_type="ipo" (length-normalized, as TRL): see the class.
- With `use_ref_model=True` and no `ref_weight`, the reference uses the policy's head (as `PreferenceLoss`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from prefuse.algorithms import get_objective, objective_loss
from prefuse.algorithms.common import batch_token_mean_nll, per_token_mean
from prefuse.kernels import linear_logprobs

__all__ = [
    "LigerFusedLinearDPOLoss",
    "LigerFusedLinearORPOLoss",
    "LigerFusedLinearCPOLoss",
    "LigerFusedLinearSimPOLoss",
    "LigerFusedLinearKTOLoss",
]


@dataclass
class SequenceLogps:
    """Per-sequence sums [N] (float32) of the head's per-token log-probs and the labeled-token counts [N]."""

    sums: torch.Tensor
    counts: torch.Tensor

    def reduced(self, average: bool) -> torch.Tensor:
        """Per-sequence log-prob [N]: the sum, or the per-token mean when `average`."""
        return per_token_mean(self.sums, self.counts) if average else self.sums


def sequence_logps(hidden, weight, labels, bias, ignore_index, head_options) -> SequenceLogps:
    """hidden [N, T, H], weight [V, H], labels [N, T] -> SequenceLogps, through prefuse's fused head."""
    token_logps = linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index, **head_options)
    return SequenceLogps(token_logps.sum(-1), (labels != ignore_index).sum(-1))


@torch.no_grad()
def row_logits_sums(hidden, weight, bias) -> torch.Tensor:
    """Sum of every logit of each row of hidden [N, T, H] @ weight.T + bias (all positions, labeled or not), without
    logits: the sum is linear, sum_t sum_v (h_t . w_v + b_v) = (sum_t h_t) . (sum_v w_v) + T * sum_v b_v. -> [N] fp64
    """
    sums = hidden.sum(1, dtype=torch.float64) @ weight.sum(0, dtype=torch.float64)
    if bias is not None:
        sums = sums + hidden.shape[1] * bias.sum(dtype=torch.float64)
    return sums


def reference_logps(use_ref_model, ref_input, ref_weight, ref_bias, weight, bias, labels, ignore_index,
                    head_options, like: torch.Tensor, average: bool) -> torch.Tensor:
    """The reference's per-sequence log-probs [N] (no gradient), or zeros when `use_ref_model` is False."""
    if not use_ref_model:
        return torch.zeros_like(like)
    if ref_input is None:
        raise ValueError("ref_input: use_ref_model=True needs the reference model's hidden states")
    if ref_weight is None:  # the reference shares the policy's head (e.g. LoRA on the decoder only)
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    with torch.no_grad():
        ref = sequence_logps(ref_input.detach(), ref_weight.detach(), labels,
                             None if ref_bias is None else ref_bias.detach(), ignore_index, head_options)
    return ref.reduced(average)


def chosen_nll(policy: SequenceLogps, n_pairs: int) -> torch.Tensor:
    """Cross-entropy of the chosen rows' labels, averaged over all their labeled tokens (0-d)."""
    return batch_token_mean_nll(policy.sums[:n_pairs], policy.counts[:n_pairs])


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
        self.head_options = head_options
        # only the options this loss type reads (Liger ignores the others)
        options = {"label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
        self.hparams = {k: v for k, v in options.items() if k in get_objective(loss_type).hparams}

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        _check_pairs(_input, target)
        n_pairs = target.shape[0] // 2
        policy = sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.head_options)
        logps = policy.reduced(self.average_log_prob)
        ref = reference_logps(self.use_ref_model, ref_input, ref_weight, ref_bias, lin_weight, bias, target,
                              self.ignore_index, self.head_options, logps, self.average_log_prob)
        # ipo normalizes by length itself, so it reads sums (an average with length 1 would give the same loss)
        if self.loss_type == "ipo" and self.average_log_prob:
            counts = policy.counts.to(logps.dtype).clamp(min=1)
            loss_logps, loss_ref = logps * counts, ref * counts
        else:
            loss_logps, loss_ref = logps, ref
        preference_loss, _ = objective_loss(
            self.loss_type, policy_chosen_logps=loss_logps[:n_pairs], policy_rejected_logps=loss_logps[n_pairs:],
            ref_chosen_logps=loss_ref[:n_pairs], ref_rejected_logps=loss_ref[n_pairs:],
            chosen_lengths=policy.counts[:n_pairs], rejected_lengths=policy.counts[n_pairs:], beta=self.beta,
            **self.hparams)
        nll = chosen_nll(policy, n_pairs) if self.compute_nll_loss else torch.zeros((), device=_input.device)
        loss = self.alpha * nll + preference_loss
        rewards = self.beta * (logps - ref)
        return paired_outputs(loss, logps, _input, lin_weight, bias, nll, rewards)


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
        self.chunk_size, self.head_options = chunk_size, head_options

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        n_pairs = target.shape[0] // 2
        policy = sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.head_options)
        logps = policy.reduced(self.average_log_prob)
        # the NLL is added below from the token log-probs (it never depends on average_log_prob), so cpo_alpha = 0
        preference_loss, _ = objective_loss(
            "cpo", policy_chosen_logps=logps[:n_pairs], policy_rejected_logps=logps[n_pairs:],
            chosen_lengths=policy.counts[:n_pairs], rejected_lengths=policy.counts[n_pairs:], beta=self.beta,
            loss_type="sigmoid", cpo_alpha=0.0, label_smoothing=self.label_smoothing)
        nll = chosen_nll(policy, n_pairs) if self.compute_nll_loss else torch.zeros((), device=_input.device)
        rewards = self.beta * logps
        return paired_outputs(self.alpha * nll + preference_loss, logps, _input, lin_weight, bias, nll, rewards)


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
        self.chunk_size, self.head_options = chunk_size, head_options

    def forward(self, lin_weight, _input, target, bias=None):
        _check_pairs(_input, target)
        n_pairs = target.shape[0] // 2
        policy = sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.head_options)
        preference_loss, _ = objective_loss(
            "simpo", policy_chosen_logps=policy.sums[:n_pairs], policy_rejected_logps=policy.sums[n_pairs:],
            chosen_lengths=policy.counts[:n_pairs], rejected_lengths=policy.counts[n_pairs:], beta=self.beta,
            simpo_gamma=self.gamma, label_smoothing=self.label_smoothing)
        nll = chosen_nll(policy, n_pairs) if self.compute_nll_loss else torch.zeros((), device=_input.device)
        logps = policy.reduced(average=True)
        rewards = self.beta * logps
        return paired_outputs(self.alpha * nll + preference_loss, logps, _input, lin_weight, bias, nll, rewards)


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
        self.compiled, self.chunk_size, self.head_options = compiled, chunk_size, head_options

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        _check_pairs(_input, target)
        n_pairs = target.shape[0] // 2
        policy = sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.head_options)
        orpo_loss, metrics = objective_loss(
            "orpo", policy_chosen_logps=policy.sums[:n_pairs], policy_rejected_logps=policy.sums[n_pairs:],
            chosen_lengths=policy.counts[:n_pairs], rejected_lengths=policy.counts[n_pairs:], beta=self.beta)
        # prefuse's orpo always includes the response NLL; Liger's is optional and may use other labels, so take
        # the odds-ratio term alone and add Liger's NLL
        odds_ratio_loss = orpo_loss - chosen_nll(policy, n_pairs)
        nll = torch.zeros((), device=_input.device)
        if self.compute_nll_loss:
            if nll_target is None:
                nll = chosen_nll(policy, n_pairs)
            else:
                nll = chosen_nll(sequence_logps(_input[:n_pairs], lin_weight, nll_target[:n_pairs], bias,
                                                self.ignore_index, self.head_options), n_pairs)
        logps = policy.reduced(average=True)
        rewards = self.beta * logps
        return paired_outputs(nll + odds_ratio_loss, logps, _input, lin_weight, bias, nll, rewards,
                              metrics["log_odds_ratio"], metrics["log_odds_chosen"])


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
        self.chunk_size, self.head_options = chunk_size, head_options

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None,
                ref_weight=None, ref_bias=None, kl=None):
        if preference_labels is None:
            raise ValueError("preference_labels: KTO needs a bool [N] marking the desirable examples")
        desirable = preference_labels.bool()
        policy = sequence_logps(_input, lin_weight, target, bias, self.ignore_index, self.head_options)
        logps = policy.reduced(self.average_log_prob)
        ref = reference_logps(self.use_ref_model, ref_input, ref_weight, ref_bias, lin_weight, bias, target,
                              self.ignore_index, self.head_options, logps, self.average_log_prob)
        # KTO with a given reference point kl is unpaired APO-zero on the log-ratios shifted by kl: prefuse's
        # `kto` objective computes its own point (clamped at 0) from KL completions, Liger takes it as given
        shifted_ref = ref if kl is None else ref + torch.as_tensor(kl).detach().to(ref)
        loss, _ = objective_loss("apo_zero_unpaired", policy_logps=logps, ref_logps=shifted_ref, labels=desirable,
                                 beta=self.beta)
        rewards = (self.beta * (logps - ref)).detach()
        logps, logits_sums = logps.detach(), row_logits_sums(_input, lin_weight, bias)
        aux = tuple(value[side].sum().float() for value in (logps, logits_sums, rewards)
                    for side in (desirable, ~desirable))
        return loss, aux
