"""Preference labels from two dialogues per scenario, and the statistics that show which way they point.

    pairs, ties = label_pairs(first, second, evaluator, "partial")   # TRL pairs (prompt, chosen, rejected) + columns
    label_summary(pairs)    # do the labels favour true utility, or the claims that raise the rating?
    dialogue_summary(dialogues)   # true utility and the evaluator's ratings of the rollouts

A pair is written only when the evaluator prefers one dialogue (a tie, P = 1/2, is counted and dropped); chosen and
rejected are the consultant's responses of the preferred and the other dialogue, as the paper's chosen and rejected
are the AI's last turns. Extra columns: `score_chosen` / `score_rejected` (the evaluator's ratings under the
feedback, which `prefuse train` carries), `chosen_utility` / `rejected_utility` (the true utilities),
`chosen_deceptive` / `rejected_deceptive`, `feedback`, `scenario_id`.

Confidence intervals: Wilson score intervals for fractions, percentile bootstrap (seeded) for means; 95% by
default.
"""
from __future__ import annotations

import math
import random

from prefuse.engine.methods.rlhs.parties import FEEDBACK, Evaluator, check_feedback
from prefuse.engine.methods.rlhs.rollouts import Dialogue

Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial fraction successes / n ((0, 1) for n = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: list[float], *, level: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (nan, nan when empty)."""
    if not values:
        return math.nan, math.nan
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    low = means[int((1 - level) / 2 * resamples)]
    high = means[min(resamples - 1, int((1 + level) / 2 * resamples))]
    return low, high


def fraction(successes: int, n: int) -> dict:
    low, high = wilson_interval(successes, n)
    return {"value": successes / n if n else math.nan, "n": n, "ci95": [low, high]}


def mean_with_ci(values: list[float], seed: int = 0) -> dict:
    low, high = bootstrap_interval(values, seed=seed)
    return {"value": sum(values) / len(values) if values else math.nan, "n": len(values), "ci95": [low, high]}


def label_pairs(first: list[Dialogue], second: list[Dialogue], evaluator: Evaluator,
                feedback: str) -> tuple[list[dict], int]:
    """(TRL pair records, number of ties) from two dialogues per scenario judged under `feedback` (their views of
    that feedback, from `rollouts.play`)."""
    check_feedback(feedback)
    if len(first) != len(second):
        raise ValueError(f"label_pairs: {len(first)} first dialogues but {len(second)} second ones")
    if any(feedback not in d.views for d in first + second):
        raise ValueError(f"label_pairs: the dialogues were not rated under {feedback!r} (play them with it)")
    preferences = evaluator.prefer([d.views[feedback] for d in first], [d.views[feedback] for d in second])
    pairs, ties = [], 0
    for a, b, p in zip(first, second, preferences, strict=True):
        if p == 0.5:
            ties += 1
            continue
        chosen, rejected = (a, b) if p > 0.5 else (b, a)
        pairs.append({"prompt": chosen.prompt, "chosen": chosen.response, "rejected": rejected.response,
                      "score_chosen": chosen.ratings[feedback], "score_rejected": rejected.ratings[feedback],
                      "chosen_utility": chosen.utility, "rejected_utility": rejected.utility,
                      "chosen_deceptive": chosen.deceptive, "rejected_deceptive": rejected.deceptive,
                      "feedback": feedback, "scenario_id": chosen.scenario.id})
    return pairs, ties


def label_summary(pairs: list[dict], ties: int = 0, seed: int = 0) -> dict:
    """Which way a label set points:
    utility_agreement        among pairs whose true utilities differ, the fraction whose chosen has the higher one
    prefers_deceptive        among pairs with exactly one deceptive response, the fraction that chose it
    utility_gain             the mean of chosen_utility - rejected_utility over all pairs
    (fractions with Wilson 95% intervals, the mean with a bootstrap one)."""
    decisive = [p for p in pairs if p["chosen_utility"] != p["rejected_utility"]]
    mixed = [p for p in pairs if p["chosen_deceptive"] != p["rejected_deceptive"]]
    return {"pairs": len(pairs), "ties": ties,
            "utility_agreement": fraction(sum(p["chosen_utility"] > p["rejected_utility"] for p in decisive),
                                          len(decisive)),
            "prefers_deceptive": fraction(sum(bool(p["chosen_deceptive"]) for p in mixed), len(mixed)),
            "utility_gain": mean_with_ci([p["chosen_utility"] - p["rejected_utility"] for p in pairs], seed)}


def dialogue_summary(dialogues: list[Dialogue], seed: int = 0) -> dict:
    """The rollouts' true utility, the evaluator's mean rating under each feedback (1-5, and normalized to [-1, 1]
    as (r - 3) / 2), the purchase, deception and parse rates."""
    n = len(dialogues)
    ratings = {f: sum(d.ratings[f] for d in dialogues) / n for f in FEEDBACK if all(f in d.ratings for d in dialogues)}
    return {"dialogues": n,
            "true_utility": mean_with_ci([d.utility for d in dialogues], seed),
            "rating": ratings,
            "rating_normalized": {f: (r - 3) / 2 for f, r in ratings.items()},
            "purchase_rate": fraction(sum(d.decision in ("A", "B", "C") for d in dialogues), n),
            "deceptive_rate": fraction(sum(d.deceptive for d in dialogues), n),
            "false_claim_rate": fraction(sum(d.false_claims > 0 for d in dialogues), n),
            "recommendation_rate": fraction(sum(d.recommended is not None for d in dialogues), n)}
