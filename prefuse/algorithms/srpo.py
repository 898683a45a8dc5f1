"""SRPO (Self-Improving Robust Preference Optimization), community form. [V-3p, the paper's L_alpha UNVERIFIED]

One model plays both the generator and the self-improvement (revision) policy; the revision policy sees the prompt
plus a previous completion c. With h(y | c) = log pi(y | x, c) - log pi_ref(y | x, c) and h(y) without context:
    L_imp = (1/2 - beta [h(y_w | y_l) - h(y_l | y_l)])^2 + (1/2 - beta [h(y_w | y_w) - h(y_l | y_w)])^2
    L_gen = (beta [h(y_w | y_l) + h(y_w) - h(y_l | y_w) - h(y_l)] - 1)^2
    L     = (1 - srpo_alpha) L_gen + srpo_alpha L_imp
Inputs, as keywords, all [B] sums of response-token log-probs, for the policy and the reference (ref_* names):
    policy_chosen_logps, policy_rejected_logps                       no context
    policy_chosen_given_chosen_logps, policy_chosen_given_rejected_logps,
    policy_rejected_given_chosen_logps, policy_rejected_given_rejected_logps   answer given context
"""

from __future__ import annotations

from .common import check_choice, reward_metrics
from .pair_scores import PAIR_INPUTS
from .registry import register

CONTEXT_PAIRS = ("chosen_given_chosen", "chosen_given_rejected", "rejected_given_chosen", "rejected_given_rejected")
SRPO_CONTEXT_INPUTS = frozenset(f"{model}_{pair}_logps" for model in ("policy", "ref") for pair in CONTEXT_PAIRS)


@register("srpo", requires=PAIR_INPUTS | SRPO_CONTEXT_INPUTS, hparams={"srpo_alpha": 0.8, "srpo_variant": "community"})
def srpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    srpo_alpha=0.8,
    srpo_variant="community",
    **context_logps,
):
    """Community-form SRPO loss per pair (see the module docstring). srpo_alpha = 0.8 is the community form's value
    (docs/methods/srpo.md) [UNVERIFIED against the paper]; srpo_variant has one value, "community", kept so
    results can be labelled. The loss matches the community code (frasermince/trl @ 295b8e8, `srpo_loss`); its
    rewards/* metrics are the unscaled log-ratios, here beta * log-ratio as in TRL's DPO (a deliberate difference).
    """
    check_choice("srpo_variant", srpo_variant, ("community",))

    def h(pair):
        return context_logps[f"policy_{pair}_logps"] - context_logps[f"ref_{pair}_logps"]

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    improve = (0.5 - beta * (h("chosen_given_rejected") - h("rejected_given_rejected"))) ** 2 + (
        0.5 - beta * (h("chosen_given_chosen") - h("rejected_given_chosen"))
    ) ** 2
    generate = (
        beta * (h("chosen_given_rejected") + chosen_logratios - h("rejected_given_chosen") - rejected_logratios) - 1
    ) ** 2
    losses = (1 - srpo_alpha) * generate + srpo_alpha * improve
    metrics = reward_metrics(beta, chosen_logratios, rejected_logratios, policy_chosen_logps, policy_rejected_logps)
    metrics.update({"loss/generate": generate.detach(), "loss/improve": improve.detach()})
    return losses, metrics
