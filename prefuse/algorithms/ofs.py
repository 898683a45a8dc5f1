"""OFS-DPO: two LoRA modules on one base, a fast one and a slow one, with a chasing regularizer.

[UNVERIFIED] Everything below the abstract level of the paper is a reconstruction (docs/methods/ofs-dpo.md); both
readings are selectable with `ofs_variant`, and results made with either should be labelled "reconstruction".

Inputs, as keywords:
    policy_chosen_logps [B], policy_rejected_logps [B]  the module in the fast ("F") role
    slow_chosen_logps [B], slow_rejected_logps [B]      the module in the slow ("S") role
    ref_chosen_logps [B], ref_rejected_logps [B]        the base model with the adapters disabled
With m = log pi(y_w) - log pi(y_l) of a module:
    ofs_variant="slow_chases_fast" (default, option A):
        L_DPO(F) + L_DPO(S) + ofs_alpha * -logsigmoid(beta (m_S - sg m_F))
    ofs_variant="two_sided" (option B of docs/methods/ofs-dpo.md):
        L_DPO(F) + ofs_alpha * -logsigmoid(clamp(beta (m_F - sg m_S)))
      + L_DPO(S) - ofs_alpha * -logsigmoid(clamp(beta (sg m_F - m_S))),  clamp to [-ofs_clamp, ofs_clamp]
      (option B's scale `s` is read as beta [UNVERIFIED]).
The two modules have separate parameters, so one backward of the sum gives each its own gradient. Role swaps and the
separate learning rates belong to the training loop; the metrics `ofs/fast_dpo_loss` and `ofs/slow_dpo_loss` feed
the swap criterion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import check_choice, reward_metrics
from .pair_scores import PAIR_INPUTS
from .registry import register

OFS_VARIANTS = ("slow_chases_fast", "two_sided")


@register(
    "ofs_dpo",
    requires=PAIR_INPUTS | {"slow_chosen_logps", "slow_rejected_logps"},
    hparams={"ofs_alpha": 0.1, "ofs_variant": "slow_chases_fast", "ofs_clamp": 10.0},
)
def ofs_dpo(
    *,
    policy_chosen_logps,
    policy_rejected_logps,
    slow_chosen_logps,
    slow_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta,
    ofs_alpha=0.1,
    ofs_variant="slow_chases_fast",
    ofs_clamp=10.0,
):
    """OFS-DPO fast/slow losses plus the chasing term (see the module docstring). [UNVERIFIED reconstruction]"""
    check_choice("ofs_variant", ofs_variant, OFS_VARIANTS)
    ref_margin = ref_chosen_logps - ref_rejected_logps
    fast_margin = policy_chosen_logps - policy_rejected_logps
    slow_margin = slow_chosen_logps - slow_rejected_logps
    fast_dpo = -F.logsigmoid(beta * (fast_margin - ref_margin))
    slow_dpo = -F.logsigmoid(beta * (slow_margin - ref_margin))

    if ofs_variant == "slow_chases_fast":
        gap = -F.logsigmoid(beta * (slow_margin - fast_margin.detach()))
        losses = fast_dpo + slow_dpo + ofs_alpha * gap
    else:
        fast_gap = -F.logsigmoid(torch.clamp(beta * (fast_margin - slow_margin.detach()), -ofs_clamp, ofs_clamp))
        slow_gap = -F.logsigmoid(torch.clamp(beta * (fast_margin.detach() - slow_margin), -ofs_clamp, ofs_clamp))
        gap = fast_gap
        losses = fast_dpo + ofs_alpha * fast_gap + slow_dpo - ofs_alpha * slow_gap

    metrics = reward_metrics(
        beta,
        policy_chosen_logps - ref_chosen_logps,
        policy_rejected_logps - ref_rejected_logps,
        policy_chosen_logps,
        policy_rejected_logps,
    )
    metrics.update(
        {"ofs/fast_dpo_loss": fast_dpo.detach(), "ofs/slow_dpo_loss": slow_dpo.detach(), "ofs/gap": gap.detach()}
    )
    return losses, metrics
