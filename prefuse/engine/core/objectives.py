"""What an objective needs from a training run: which sequences (roles), which data columns, a reference or not.

    needs = objective_needs(["sigmoid"])       # ObjectiveNeeds(data="pairs", roles=("chosen", "rejected"), ...)
    needs = objective_needs(["xpo"])           # ValueError: one line naming the flag that runs it

Offline data provides these roles and inputs (the objective's input names, `prefuse.algorithms.roles`):
    chosen, rejected           the pair's two responses (standard or conversational pairs)
    sample                     `reference_response`: a response y_ref of the reference model (SELM)
    completion                 one response per example: the unpaired format, or each side of a scored pair
    kl                         KTO's mismatched pairs: each prompt with the previous example's completion
    labels                     `label` (unpaired), or chosen = True and rejected = False
    rewards                    `reward` (unpaired), or `score_chosen` / `score_rejected` of a pair
    advantages                 `advantage`, or the reward minus the training set's mean reward
    preference_probs           `preference_prob`: P(chosen > rejected) from a judge, in [0, 1]
    online_rejected            `generated_rejected`: Avg-DPO's y~-, a rejected response the policy generated
                               (e.g. by `prefuse bdhs`), beside the external `rejected`
    slow_*_logps               OFS-DPO's second LoRA adapter (the run adds it: prefuse train --use_peft)
Objectives whose inputs come from generation during training are refused, with the flag that runs them.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefuse.algorithms import get_objective
from prefuse.algorithms.roles import role_inputs
from prefuse.algorithms.srpo import CONTEXT_PAIRS

# SRPO's <answer>_given_<context> rows: the answer after a revision prompt holding the context (engine/methods/srpo.py)
REVISION_ROLES = CONTEXT_PAIRS
# the roles that a batch of offline pairs (chosen / rejected columns and their companions) can hold
PAIR_DATA_ROLES = ("chosen", "rejected", "sample", "online_rejected") + REVISION_ROLES
COMPLETION_ROLES = ("completion", "kl")

# input -> the data columns it comes from, as docs/training.md and `prefuse objectives` show them
INPUT_COLUMNS = {
    "sample": "reference_response",
    "labels": "label (or chosen=True / rejected=False)",
    "rewards": "reward (or score_chosen / score_rejected)",
    "advantages": "advantage (or reward minus the mean reward)",
    "preference_probs": "preference_prob",
}
# what each column-backed input needs to be present in the file (pairs, completions)
REQUIRED_COLUMNS = {
    "sample": {"pairs": ("reference_response",)},
    "online_rejected": {"pairs": ("generated_rejected",)},
    "preference_probs": {"pairs": ("preference_prob",)},
    "rewards": {"pairs": ("score_chosen", "score_rejected"), "completions": ("reward",)},
    "advantages": {"pairs": ("score_chosen", "score_rejected"), "completions": ("reward",)},
}

# inputs a second LoRA adapter of the policy gives (OFS-DPO's slow module; prefuse train --use_peft)
SLOW_ADAPTER_INPUTS = frozenset({"slow_chosen_logps", "slow_rejected_logps"})

# objectives whose inputs offline data cannot hold, and what will run them
NOT_OFFLINE = {
    "xpo": "its y_r is sampled from the reference during training; run it with prefuse train --online",
    "nash_md": "it samples from the policy and the policy/reference mixture during training; run it with "
               "prefuse train --online",
    "grpo": "its k samples per prompt come from the policy during training; run it with prefuse train --online",
    "rloo": "its k samples per prompt come from the policy during training; run it with prefuse train --online",
    "hypo": "its k samples per prompt come from the policy during training; run it with prefuse train --online "
            "(on a paired dataset)",
    "hypo_kl": "its k samples per prompt come from the policy during training; run it with prefuse train --online",
    "mixed_dpo": "its online pair is sampled from the policy and judged during training, beside the offline pair; "
                 "run it with prefuse train --online on a pairs file, with a judge",
}


@dataclass(frozen=True)
class ObjectiveNeeds:
    """data: "pairs" (one example = a pair) or "completions" (one example = one response); roles: the sequences
    a batch holds; inputs: the pass-through inputs drawn from columns; reference: a reference model's log-probs
    are read."""

    data: str
    roles: tuple[str, ...]
    inputs: tuple[str, ...]
    reference: bool
    slow_adapter: bool = False  # OFS-DPO: a second LoRA adapter's chosen/rejected sums (engine/methods/ofs_adapters.py)

    @property
    def revision(self) -> bool:
        """SRPO: the batches hold the rows with a revision prompt (engine/methods/srpo.py)."""
        return bool(set(REVISION_ROLES) & set(self.roles))

    def columns(self, file_kind: str) -> tuple[str, ...]:
        """The extra columns a file of `file_kind` ("pairs" or "completions") must have."""
        out: list[str] = []
        for name in self.roles + self.inputs:
            out += [c for c in REQUIRED_COLUMNS.get(name, {}).get(file_kind, ()) if c not in out]
        return tuple(out)


def objective_needs(loss_types: list[str]) -> ObjectiveNeeds:
    """The run an objective list needs; ValueError (one line, starting with `loss_type:`) when offline data
    cannot feed it."""
    specs = []
    for name in loss_types:
        try:
            specs.append(get_objective(name))
        except ValueError as error:
            raise ValueError(f"loss_type: {error}") from None
    for spec in specs:
        if spec.name in NOT_OFFLINE:
            raise ValueError(f"loss_type: {spec.name!r} does not run on offline data: {NOT_OFFLINE[spec.name]}")
    required = [s for s in role_inputs(specs) if s.required]
    roles = sorted({s.role for s in required})
    data = "completions" if set(roles) <= set(COMPLETION_ROLES) else "pairs"
    allowed = COMPLETION_ROLES if data == "completions" else PAIR_DATA_ROLES
    if not set(roles) <= set(allowed):
        raise ValueError(f"loss_type: {loss_types} read the roles {roles}, which one kind of offline data cannot "
                         f"hold together (pairs give {PAIR_DATA_ROLES}, completions {COMPLETION_ROLES})")
    passthrough = sorted(set().union(*(spec.requires for spec in specs)) - {s.name for s in role_inputs(specs)}
                         - SLOW_ADAPTER_INPUTS)
    unknown = [name for name in passthrough if name not in INPUT_COLUMNS]
    if unknown:
        raise ValueError(f"loss_type: {loss_types} need {unknown}, which offline data does not provide")
    if data == "pairs" and {"labels", "rewards", "advantages"} & set(passthrough):
        raise ValueError(f"loss_type: {loss_types} mix pair objectives with per-response ones")
    slow = any(SLOW_ADAPTER_INPUTS & spec.requires for spec in specs)
    return ObjectiveNeeds(data=data, roles=tuple(roles), inputs=tuple(passthrough),
                          reference=any(s.source == "ref" for s in required), slow_adapter=slow)
