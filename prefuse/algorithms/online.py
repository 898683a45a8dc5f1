"""Objectives of the online methods: terms computed on responses sampled during training.

- selm        DPO + SELM's optimism bonus alpha * beta * log pi(y_ref)         (arXiv 2405.19332)
- xpo         DPO (sigmoid or ipo) + XPO's exploration term alpha * log pi(y_r) (arXiv 2405.21046, TRL semantics)
- online_ipo  IPO against a soft preference probability p = P(y > y')           (arXiv 2403.08635); tau on
              whole-response log-ratios (the paper's h), or per token with average_log_prob=True (what `ipo`,
              TRL's DPOTrainer, takes)
- nash_md     Nash-MD policy-gradient loss beta * KL term - (p - 1/2) log pi(y)  (arXiv 2403.08635); its KL
              term's default estimator is the sequence-level score function (unbiased for the sequence KL's gradient);
              TRL's Nash-MD trainer's per-token one is kl_estimator="token"
- hypo_kl     HyPO's online reverse-KL term, REINFORCE with a leave-one-out baseline
              (arXiv 2406.01462, [UNVERIFIED])
- hypo        DPO on offline pairs + kl_coef * hypo_kl on online samples
Per-token inputs, where an option needs them, are [B, T] (or [P, k, T]) with a `*token_mask` of the same shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_choice, require_inputs, reward_metrics, safe_exp
from .pair_scores import PAIR_INPUTS
from .registry import register


def _dpo_pair(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    return chosen_logratios, rejected_logratios


def _pair_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps):
    return reward_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)


@register(
    "selm",
    requires=PAIR_INPUTS | {"policy_sample_logps"},
    optional={"ref_sample_logps"},
    hparams={"alpha": 0.001},
)
def selm(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_sample_logps,
    beta,
    ref_sample_logps=None,
    alpha=0.001,
):
    """SELM: -logsigmoid(beta (h_c - h_r)) + alpha * beta * (log pi(y_ref) - sg log pi_ref(y_ref)).

    policy_sample_logps [B]: log pi_theta of the response y_ref sampled (greedily) from the reference model.
    ref_sample_logps [B] (optional, no gradient) is subtracted as in the authors' reference form (docs/methods/
    selm.md); it changes the value, not the gradient. alpha * beta follows the paper's eq. 4.2 (Algorithm 1 omits
    beta).
    """
    chosen_logratios, rejected_logratios = _dpo_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    dpo_losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    sample_logratios = policy_sample_logps
    if ref_sample_logps is not None:
        sample_logratios = policy_sample_logps - ref_sample_logps.detach()
    optimism = alpha * beta * sample_logratios
    metrics = _pair_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)
    metrics.update({"loss/dpo": dpo_losses.detach(), "loss/optimism": optimism.detach()})
    return dpo_losses + optimism, metrics


@register(
    "xpo",
    requires=PAIR_INPUTS | {"policy_sample_logps"},
    hparams={"alpha": 1e-5, "loss_type": "sigmoid"},
)
def xpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_sample_logps,
    beta,
    alpha=1e-5,
    loss_type="sigmoid",
):
    """XPO: DPO loss on the judged pair + alpha * log pi_theta(y_r), y_r sampled from the reference model.

    The pair is (policy sample, reference sample) ordered by the judge, so y_r is also one side of the pair;
    policy_sample_logps [B] is log pi_theta(y_r) (summed over tokens). loss_type: "sigmoid" or "ipo"
    ((delta - 1/(2 beta))^2 on summed log-ratios, not length-normalized).
    Metrics: as TRL's XPOTrainer except logps/chosen and logps/rejected, which TRL logs as mean(policy) +
    mean(reference) log-probs of that side; here they are the policy's alone, as in TRL's DPO (a deliberate difference,
    tested against TRL 0.23.1 in tests/test_algorithms_seed_golden.py).
    """
    check_choice("loss_type", loss_type, ("sigmoid", "ipo"))
    chosen_logratios, rejected_logratios = _dpo_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    delta = chosen_logratios - rejected_logratios
    dpo_losses = -F.logsigmoid(beta * delta) if loss_type == "sigmoid" else (delta - 1 / (2 * beta)) ** 2
    exploration = alpha * policy_sample_logps
    metrics = _pair_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)
    metrics.update({"loss/dpo": dpo_losses.detach(), "loss/xpo": exploration.detach()})
    return dpo_losses + exploration, metrics


@register("online_ipo", requires=PAIR_INPUTS | {"preference_probs"},
          optional={"chosen_lengths", "rejected_lengths"}, hparams={"average_log_prob": False})
def online_ipo(
    *, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, preference_probs, beta,
    chosen_lengths=None, rejected_lengths=None, average_log_prob=False,
):
    """Online IPO with soft labels: ((h(y) - h(y')) - (p - 1/2) / beta)^2, beta = tau. [UNVERIFIED form]

    Here "chosen" is y and "rejected" is y' (two samples, in either order) and preference_probs [B] is
    p = P(y > y' | x) from the preference model. h is the whole response's log-ratio log pi - log pi_ref (the
    paper's), so p = 1 gives IPO on summed log-ratios; average_log_prob=True divides each by its token count
    (chosen_lengths, rejected_lengths [B]), which is how the offline `ipo` (TRL's DPOTrainer) reads tau: the same
    tau then means the same margin per token in both.
    """
    chosen_logratios, rejected_logratios = _dpo_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    if average_log_prob:
        require_inputs("online_ipo with average_log_prob=True", chosen_lengths=chosen_lengths,
                       rejected_lengths=rejected_lengths)
        chosen_logratios = chosen_logratios / chosen_lengths.clamp(min=1)
        rejected_logratios = rejected_logratios / rejected_lengths.clamp(min=1)
    target = (preference_probs.detach() - 0.5) / beta
    losses = (chosen_logratios - rejected_logratios - target) ** 2
    metrics = _pair_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)
    metrics["rewards/probabilities"] = preference_probs.detach()
    return losses, metrics


NASH_MD_TOKEN_INPUTS = frozenset({"policy_token_logps", "ref_token_logps", "token_mask"})


@register(
    "nash_md",
    requires={"policy_logps", "ref_logps", "preference_probs"},
    optional=NASH_MD_TOKEN_INPUTS,
    hparams={"kl_estimator": "sequence"},
)
def nash_md(
    *,
    policy_logps,
    ref_logps,
    preference_probs,
    beta,
    kl_estimator="sequence",
    policy_token_logps=None,
    ref_token_logps=None,
    token_mask=None,
):
    """Nash-MD policy gradient: beta * KL term - (p - 1/2) * log pi(y), y sampled from the policy.

    policy_logps, ref_logps [B]: summed log-probs of the policy sample y; preference_probs [B]: P(y > y_mix) against
    the geometric-mixture sample (0.5 is the control variate). KL term (REINFORCE, no baseline):
      kl_estimator="sequence" (default): sg(log pi(y) - log pi_ref(y)) * log pi(y)  (the score-function estimator of
        the sequence-level KL gradient);
      kl_estimator="token" (TRL semantics): sum_t sg(log pi_t - log pi_ref_t) * log pi_t, from policy_token_logps,
        ref_token_logps, token_mask [B, T].
    """
    check_choice("kl_estimator", kl_estimator, ("sequence", "token"))
    sequence_logratios = (policy_logps - ref_logps).detach()
    if kl_estimator == "sequence":
        kl_term = sequence_logratios * policy_logps
    else:
        require_inputs(
            "nash_md with kl_estimator='token'",
            policy_token_logps=policy_token_logps,
            ref_token_logps=ref_token_logps,
            token_mask=token_mask,
        )
        per_token = (policy_token_logps - ref_token_logps).detach() * policy_token_logps
        # where(), not a product with the mask: padding may hold any value, and inf * 0 would be NaN
        kl_term = torch.where(token_mask.bool(), per_token, torch.zeros_like(per_token)).sum(-1)
    score = (preference_probs.detach() - 0.5) * policy_logps
    metrics = {
        "loss/score": score.detach(),
        "loss/kl": sequence_logratios,
        "rewards/probabilities": preference_probs.detach(),
        "logps/chosen": policy_logps.detach(),
    }
    return beta * kl_term - score, metrics


HYPO_ONLINE_INPUTS = frozenset({"policy_online_logps", "ref_online_logps"})
HYPO_TOKEN_INPUTS = frozenset({"policy_online_token_logps", "ref_online_token_logps", "online_token_mask"})
KL_ESTIMATORS = ("reinforce_rloo", "reinforce_nobaseline", "per_token_k3")


def online_kl_surrogate(
    policy_online_logps,
    ref_online_logps,
    kl_estimator="reinforce_rloo",
    policy_online_token_logps=None,
    ref_online_token_logps=None,
    online_token_mask=None,
):
    """HyPO's reverse-KL surrogate per prompt, from k policy samples per prompt.

    policy_online_logps, ref_online_logps [P, k] (summed log-probs of sample y_i) -> [P]:
      reinforce_rloo (default): mean_i (d_i - b_i) * log pi(y_i), d = sg(log-ratio), b_i = mean_{j != i} d_j
        (b = 0 when k = 1);
      reinforce_nobaseline: mean_i d_i * log pi(y_i);
      per_token_k3: from the [P, k, T] token inputs. VALUE mean_i sum_t k3_t, k3 = exp(r_t) - r_t - 1 with
        r_t = sg(log pi_ref_t - log pi_t) (the non-negative, low-variance estimate of KL(pi || pi_ref), what gets
        logged); GRADIENT the score-function (REINFORCE) one of the reverse KL, mean_i sum_t G_t grad log pi_t with
        the reward-to-go G_t = sum_{s >= t} sg(log pi_s - log pi_ref_s). Differentiating k3 itself (the pathwise
        gradient, 1 - pi_ref_t / pi_t per token) would give the FORWARD KL's gradient in expectation, not this one.
    """
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_estimator == "per_token_k3":
        require_inputs(
            "hypo_kl with kl_estimator='per_token_k3'",
            policy_online_token_logps=policy_online_token_logps,
            ref_online_token_logps=ref_online_token_logps,
            online_token_mask=online_token_mask,
        )
        mask = online_token_mask.bool()

        def masked(values):  # where(), not a product: padding may hold any value, and inf * 0 would be NaN
            return torch.where(mask, values, torch.zeros_like(values))

        ref_minus_policy = masked(ref_online_token_logps - policy_online_token_logps).detach()
        k3 = safe_exp(ref_minus_policy) - ref_minus_policy - 1  # 0 on padding
        reward_to_go = (-ref_minus_policy).flip(-1).cumsum(-1).flip(-1)
        # zero-valued, so the loss's value stays the k3 estimate; its gradient is sum_t G_t grad log pi_t
        score = masked(reward_to_go * (policy_online_token_logps - policy_online_token_logps.detach()))
        return (k3.sum(-1) + score.sum(-1)).mean(-1)
    logratios = (policy_online_logps - ref_online_logps).detach()
    num_samples = logratios.shape[-1]
    if kl_estimator == "reinforce_rloo" and num_samples > 1:
        baseline = (logratios.sum(-1, keepdim=True) - logratios) / (num_samples - 1)
    else:
        baseline = torch.zeros_like(logratios)
    return ((logratios - baseline) * policy_online_logps).mean(-1)


@register(
    "hypo_kl",
    requires=HYPO_ONLINE_INPUTS,
    optional=HYPO_TOKEN_INPUTS,
    hparams={"kl_estimator": "reinforce_rloo"},
)
def hypo_kl(
    *,
    policy_online_logps,
    ref_online_logps,
    beta,
    kl_estimator="reinforce_rloo",
    policy_online_token_logps=None,
    ref_online_token_logps=None,
    online_token_mask=None,
):
    """HyPO's online KL term alone, one loss per prompt [P] (see `online_kl_surrogate`). [UNVERIFIED estimator]

    Combine it with an offline loss through the API: objective_loss(["sigmoid", "hypo_kl"], loss_weights=[1, lam]).
    beta is not used (the KL weight is the combination weight).
    """
    losses = online_kl_surrogate(
        policy_online_logps,
        ref_online_logps,
        kl_estimator,
        policy_online_token_logps,
        ref_online_token_logps,
        online_token_mask,
    )
    return losses, {"objective/kl": (policy_online_logps - ref_online_logps).detach().mean(-1)}


@register(
    "hypo",
    requires=PAIR_INPUTS | HYPO_ONLINE_INPUTS,
    optional=HYPO_TOKEN_INPUTS,
    hparams={"kl_coef": 0.1, "kl_estimator": "reinforce_rloo"},
    separable=False,
)
def hypo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    policy_online_logps,
    ref_online_logps,
    beta,
    kl_coef=0.1,
    kl_estimator="reinforce_rloo",
    policy_online_token_logps=None,
    ref_online_token_logps=None,
    online_token_mask=None,
):
    """HyPO: DPO on the offline pairs [B] + kl_coef (lambda) * the mean online KL surrogate over the prompts [P].

    The KL part is a batch-level constant added to every example's loss, so the batch mean is
    mean(DPO) + kl_coef * mean(KL surrogate). kl_coef = 0.1 is a toy default. [UNVERIFIED]
    """
    chosen_logratios, rejected_logratios = _dpo_pair(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    dpo_losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    kl_losses = online_kl_surrogate(
        policy_online_logps,
        ref_online_logps,
        kl_estimator,
        policy_online_token_logps,
        ref_online_token_logps,
        online_token_mask,
    )
    metrics = _pair_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)
    metrics.update(
        {
            "loss/dpo": dpo_losses.detach(),
            "loss/kl": kl_losses.detach().mean(),
            "objective/kl": (policy_online_logps - ref_online_logps).detach().mean(),
        }
    )
    return dpo_losses + kl_coef * kl_losses.mean(), metrics
