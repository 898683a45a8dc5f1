"""prefuse's objectives: pure functions of sequence-level statistics, looked up by name.

    from prefuse.algorithms import objective_loss, list_objectives, get_objective
    loss, metrics = objective_loss("sigmoid", policy_chosen_logps=..., policy_rejected_logps=...,
                                   ref_chosen_logps=..., ref_rejected_logps=..., beta=0.1)

Input names (all [B] unless noted; *_logps are SUMS of response-token log-probs, prompt tokens excluded):
    policy_{chosen,rejected}_logps, ref_{chosen,rejected}_logps   a preference pair under the policy / the reference
    {chosen,rejected}_lengths                                      response token counts (int)
    *_{chosen,rejected}_verbose_logps                              LD-DPO: the part of each sum past the shared length
    policy_{chosen,rejected}_log_sum_sq_probs                      WPO: sum over the response of log sum_v pi(v)^2
    policy_logps, ref_logps, labels (bool)                         unpaired examples (KTO, A-LoL, Nash-MD)
    policy_kl_logps, ref_kl_logps                                  KTO's mismatched "KL" completions
    policy_sample_logps, ref_sample_logps                          SELM / XPO: a response sampled from the reference
    preference_probs                                               P(y > y') from a judge (online IPO, Nash-MD)
    policy_online_*_logps, ref_online_*_logps                      a policy-generated pair or rejected (Mixed/Avg-DPO);
                                                                   [P, k] samples per prompt for HyPO
    slow_{chosen,rejected}_logps                                   OFS-DPO's slow module
    policy_{answer}_given_{context}_logps, ref_...                 SRPO's revision log-probs
    advantages, rewards                                            A-LoL and its baselines; [P, k] for GRPO, RLOO
    *_token_logps [B, T] (or [P, k, T]), *token_mask               per-token inputs for the options that need them
`get_objective(name).accepts()` lists what one objective takes.
"""

# Importing the family modules fills the registry.
from . import alol, dpo, kto, mixed, ofs, online, policy_gradient, reference_free, srpo  # noqa: F401
from .hparams import check_hparams
from .loss import objective_loss
from .registry import ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["objective_loss", "list_objectives", "get_objective", "ObjectiveSpec", "register", "check_hparams"]
