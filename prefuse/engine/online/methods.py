"""How each online objective makes its batches from rollouts (its method), the judges each method takes, and
what the step then needs: the table that `prefuse train --online` and `prefuse objectives` read."""
from __future__ import annotations

import random

from prefuse.algorithms import get_objective
from prefuse.algorithms.roles import role_inputs
from prefuse.engine.core.objectives import ObjectiveNeeds

# the roles of one judged pair of rollouts: an objective that reads only these runs as the "judged_pair" method
JUDGED_PAIR_ROLES = {"chosen", "rejected"}
SPECIAL = {"online_ipo": "soft_pair", "xpo": "xpo", "selm": "selm", "nash_md": "nash_md", "grpo": "groups",
           "rloo": "groups", "hypo": "hybrid", "hypo_kl": "samples", "mixed_dpo": "mixed", "avg_dpo": "avg"}
ONLINE_DESCRIPTIONS = {
    "judged_pair": "--online: 2 policy samples per prompt (or --pair_samples n: best vs worst, all-tied prompts "
                   "dropped), the judge picks",
    "soft_pair": "--online: 2 policy samples per prompt, preference_probs = the judge's P(first > second)",
    "xpo": "--online: a policy sample and a reference sample, judged; the reference sample is also `sample`",
    "selm": "--online: two policy samples and the reference's greedy y_ref ranked by the judge, best against "
            "worst (y_ref may be either); y_ref is also `sample`",
    "nash_md": "--online: a policy sample against a geometric-mixture sample, preference_probs from the judge",
    "groups": "--online: --num_generations samples per prompt, their judged scores as rewards",
    "hybrid": "--online on a paired dataset: its pairs and --num_generations policy samples per prompt; no judge",
    "samples": "--online: --num_generations policy samples per prompt; no judge",
    "mixed": "--online on a paired dataset: per example the offline pair with probability --mixed_p, else 2 policy "
             "samples judged into an online pair (only the drawn pair is sampled and scored)",
    "avg": "--online on a paired dataset: its pairs and y~-, a policy sample per prompt (--avg_rejected), as "
           "online_rejected beside the shared chosen; no judge",
}
# methods without a judge, and why (HyPO learns from the offline pairs and the samples' KL)
JUDGELESS = {"hybrid": "HyPO learns from offline pairs and the samples' KL",
             "samples": "HyPO learns from offline pairs and the samples' KL",
             "avg": "Avg-DPO's generated y~- is the rejected response by construction"}
# the judge kinds each method takes: a pairwise preference model compares, it gives no scores, so the methods
# whose loss reads scores (GRPO's and RLOO's rewards) refuse it
SCORING_JUDGES = ("reward functions (--reward_funcs)", "a reward model (--reward_model_path)",
                  "a vision-language judge (--judge DIR)", "a rule judge (--judge copy)")
NEEDS_SCORES = {"groups": "grpo and rloo take the judge's scores as rewards"}


def judge_kinds(method: str) -> str:
    """The judges `method` runs with, in words (`prefuse objectives`)."""
    if method in JUDGELESS:
        return "none (" + JUDGELESS[method] + ")"
    kinds = list(SCORING_JUDGES) + ([] if method in NEEDS_SCORES else ["a pairwise preference model (--judge DIR)"])
    return ", ".join(kinds)


def check_judge(method: str, pairwise: bool, missing_eos_penalty: float | None) -> None:
    """ValueError (`judge: ...`) for a pairwise judge where the method needs scores or a penalty is asked for."""
    if pairwise and method in NEEDS_SCORES:
        raise ValueError(f"judge: a pairwise preference model compares two samples and gives no scores; "
                         f"{NEEDS_SCORES[method]}: use --reward_funcs or --reward_model_path")
    if pairwise and missing_eos_penalty is not None:
        raise ValueError("missing_eos_penalty: a pairwise judge gives no scores to lower; drop --missing_eos_penalty "
                         "or judge with --reward_funcs / --reward_model_path")


PAIRED = ("hybrid", "mixed", "avg")  # methods that read a paired dataset's pairs, not only its prompts
SAMPLERS = ("policy", "mixture")
AVG_REJECTED = ("policy", "bdhs")


def mixed_draws(seed: int, n: int, p: float) -> list[bool]:
    """Mixed-DPO's a_i ~ Bernoulli(p) of a batch's n examples (True: the offline pair), from the batch's seed
    only: a generator of its own (the run's RNG and the rollouts' untouched), so a resumed run draws the same."""
    rng = random.Random(f"mixed_dpo/{seed}")
    return [rng.random() < p for _ in range(n)]


def online_method(loss_types: list[str]) -> str:
    """How the batches of `loss_types` are made from rollouts; ValueError (`loss_type: ...`) for an objective
    that does not run online."""
    methods = set()
    for name in loss_types:
        spec = get_objective(name)
        if spec.name in SPECIAL:
            methods.add(SPECIAL[spec.name])
            continue
        required = [s for s in role_inputs([spec]) if s.required]
        others = spec.requires - {s.name for s in role_inputs([spec])}
        if {s.role for s in required} <= JUDGED_PAIR_ROLES and not others:
            methods.add("judged_pair")
        else:
            raise ValueError(f"loss_type: {spec.name!r} does not run with --online (it reads "
                             f"{sorted(spec.requires)}); online objectives: the DPO family, simpo, cpo, orpo, "
                             f"online_ipo, xpo, selm, nash_md, grpo, rloo, hypo, hypo_kl, mixed_dpo, avg_dpo")
    if len(methods) != 1:
        raise ValueError(f"loss_type: {loss_types} build their online batches differently ({sorted(methods)}); "
                         f"combine objectives of one kind")
    return methods.pop()


# objectives whose reference term is weighted by beta and read only when beta != 0
REFERENCE_WHEN_BETA = {"grpo", "rloo"}


def online_needs(loss_types: list[str], beta: float = 0.1) -> ObjectiveNeeds:
    method = online_method(loss_types)
    specs = [get_objective(n) for n in loss_types]
    roles = {"judged_pair": ("chosen", "rejected"), "soft_pair": ("chosen", "rejected"),
             "xpo": ("chosen", "rejected", "sample"), "selm": ("chosen", "rejected", "sample"),
             "nash_md": ("completion",), "groups": ("online",), "hybrid": ("chosen", "rejected", "online"),
             "samples": ("online",), "mixed": ("chosen", "rejected", "online_chosen", "online_rejected"),
             "avg": ("chosen", "rejected", "online_rejected")}[method]
    inputs = {"soft_pair": ("preference_probs",), "nash_md": ("preference_probs",), "groups": ("rewards",),
              "mixed": ("use_offline",)}.get(method, ())
    reference = any(s.source == "ref" and s.required for s in role_inputs(specs)) or (
        beta != 0 and any(spec.name in REFERENCE_WHEN_BETA for spec in specs))
    return ObjectiveNeeds(data="online", roles=roles, inputs=inputs, reference=reference)
