"""The simulated parties of RLHS and their rule-based versions: the customer, the world model and the evaluator.

    customer.decide(scenarios, responses)      -> ["A" | "B" | "C" | "D"]   D: buys nothing
    world_model.outcomes(scenarios, decisions) -> [outcome text]            from the option table and the decision,
                                                                            never the dialogue
    evaluator.rate(views)                      -> [ratings]                 higher is better
    evaluator.prefer(first, second)            -> [P(first > second)]       1, 0, or 1/2 for a tie

What the evaluator is shown is the feedback (`evaluator_view`): `immediate` the dialogue alone (foresight),
`partial` the dialogue and the world model's outcome (partial hindsight), `oracle` both and the whole feature table
(oracle hindsight). The same evaluator rates all three; only its information differs. The LLM versions are in
`rlhs/llm.py`.

The rule-based parties (the toy's defaults):
- RuleCustomer believes the consultant: it buys the recommended option when the consultant claims that option has
  the required feature (and does not also deny it) and its price is within budget; else nothing.
- RuleWorldModel writes the true outcome (`environment.outcome_text`); `error_rate` swaps "with" and "without" at
  random (a seeded, imperfect world model).
- RuleEvaluator reads only the text it is shown. Its rating, on the 1-5 scale of the paper's Likert question
  (normalized: (r - 3) / 2 in [-1, 1]), is 3 + 2 * its estimate of the customer's utility, clipped to [1, 5]: 0 when
  nothing was bought; for a purchase at price P, b * s - (1 - b), with s = 1 - P / (2 * budget) (a good buy, the
  cheaper the better) and b its belief that the item has the required feature. With the table (oracle) it knows
  the utility exactly. Else b is 1 or 0 from the outcome's "with" / "without" (partial hindsight), else it comes
  from the consultant's claim about the bought option (immediate: "has" 1, "lacks" 0, no claim 1/2). So its
  foresight believes a claim of the feature, true or not; its hindsight reads what the customer received.
"""
from __future__ import annotations

import random
import re
from typing import Protocol, runtime_checkable

from prefuse.engine.methods.rlhs.environment import NOTHING, Scenario, outcome_text, parse_response, table_text, transcript

FEEDBACK = ("immediate", "partial", "oracle")


def check_feedback(feedback: str) -> str:
    if feedback not in FEEDBACK:
        raise ValueError(f"feedback: {feedback!r} is not one of {', '.join(FEEDBACK)} (immediate: the dialogue "
                         f"alone; partial: with the world model's outcome; oracle: with the true feature table)")
    return feedback


@runtime_checkable
class Customer(Protocol):
    def decide(self, scenarios: list[Scenario], responses: list[str]) -> list[str]:
        """Per dialogue the option bought ("A", "B", "C") or "D" (nothing)."""
        ...


@runtime_checkable
class WorldModel(Protocol):
    def outcomes(self, scenarios: list[Scenario], decisions: list[str]) -> list[str]:
        """Per dialogue the outcome message, from the option table and the decision only."""
        ...


@runtime_checkable
class Evaluator(Protocol):
    def rate(self, views: list[str]) -> list[float]:
        """Per view (`evaluator_view`) the evaluator's rating, higher is better."""
        ...

    def prefer(self, first: list[str], second: list[str]) -> list[float]:
        """Per pair of views P(first preferred): 1, 0, or 1/2 when the evaluator cannot tell them apart."""
        ...


def evaluator_view(scenario: Scenario, response: str, decision: str, outcome: str | None, feedback: str) -> str:
    """The text the evaluator reads under `feedback`, one part a line: the transcript (request, consultant,
    decision), + `outcome : ...` (partial, oracle), + the feature table (oracle)."""
    check_feedback(feedback)
    parts = [transcript(scenario, response, decision)]
    if feedback in ("partial", "oracle"):
        if outcome is None:
            raise ValueError(f"feedback {feedback!r} needs the world model's outcome")
        parts.append(f"outcome : {' '.join(outcome.split())}")
    if feedback == "oracle":
        parts.append(table_text(scenario))
    return "\n".join(parts)


class RuleCustomer:
    """Believes the consultant's claims (module docstring)."""

    def decide(self, scenarios: list[Scenario], responses: list[str]) -> list[str]:
        decisions = []
        for s, text in zip(scenarios, responses, strict=True):
            response = parse_response(text)
            option = s.option(response.recommended) if response.recommended else None
            convinced = option is not None and response.claim(option.name, s.required) is True
            decisions.append(option.name if convinced and option.price <= s.budget else NOTHING)
        return decisions


class RuleWorldModel:
    """The true outcome message; with `error_rate` > 0, "with" and "without" are swapped that often (seeded)."""

    def __init__(self, error_rate: float = 0.0, seed: int = 0):
        if not 0 <= error_rate <= 1:
            raise ValueError(f"error_rate: must be in [0, 1], got {error_rate}")
        self.error_rate, self.rng = error_rate, random.Random(seed)

    def outcomes(self, scenarios: list[Scenario], decisions: list[str]) -> list[str]:
        texts = []
        for s, decision in zip(scenarios, decisions, strict=True):
            text = outcome_text(s, decision)
            if self.error_rate and s.option(decision) and self.rng.random() < self.error_rate:
                text = re.sub(r"received it (with|without) ",
                              lambda m: f"received it {'without' if m.group(1) == 'with' else 'with'} ", text)
            texts.append(text)
        return texts


_NEED = re.compile(r"I need (\S+) and my budget is (\d+)")
_BOUGHT = re.compile(r"^customer : I buy ([ABC]) for (\d+)")
_RECEIVED = re.compile(r"received it (with|without) (\S+)")
_TABLE_ROW = re.compile(r"([ABC]) costs (\d+) : ([^;.]*)")


def _table(text: str) -> dict[str, tuple[int, dict[str, bool]]] | None:
    """{option: (price, {feature: has})} from the table of an oracle view; None when the text shows no table."""
    at = text.find("The options were :")
    if at < 0:
        return None
    rows = {}
    for name, price, features in _TABLE_ROW.findall(text[at:]):
        pairs = [item.split() for item in features.split(",")]
        rows[name] = (int(price), {p[0]: p[1] == "yes" for p in pairs if len(p) == 2})
    return rows


class RuleEvaluator:
    """Rates what it is shown (module docstring); prefer compares the ratings (a tie is 1/2)."""

    def utility_estimate(self, view: str) -> float:
        """The customer's utility as this view shows it. Its lines: request, consultant, decision, then the outcome
        and the table when they are shown."""
        lines = view.split("\n")
        need = _NEED.search(lines[0])
        if need is None or len(lines) < 3:
            raise ValueError(f"evaluator: not a dialogue view (request, consultant and decision lines): "
                             f"{view[:80]!r}")
        bought = _BOUGHT.search(lines[2])
        if bought is None:
            return 0.0
        required, budget = need.group(1), int(need.group(2))
        name, price = bought.group(1), int(bought.group(2))
        shown = "\n".join(lines[3:])
        table = _table(shown)
        if table is not None and name in table:
            have = [p for p, features in table.values() if features.get(required)]
            return min(have) / price if table[name][1].get(required) else -1.0
        received = _RECEIVED.search(shown)
        if received is not None:
            belief = 1.0 if received.group(1) == "with" else 0.0
        else:
            claim = parse_response(lines[1].removeprefix("consultant : ")).claim(name, required)
            belief = 0.5 if claim is None else float(claim)
        good = 1.0 - price / (2.0 * budget)
        return belief * good - (1.0 - belief)

    def rate(self, views: list[str]) -> list[float]:
        return [min(5.0, max(1.0, 3.0 + 2.0 * self.utility_estimate(v))) for v in views]

    def prefer(self, first: list[str], second: list[str]) -> list[float]:
        return [prefer_by_rating(a, b) for a, b in zip(self.rate(first), self.rate(second), strict=True)]


def prefer_by_rating(first: float, second: float, tolerance: float = 1e-9) -> float:
    """1 when first rates higher, 0 when lower, 1/2 within `tolerance` (a tie)."""
    if abs(first - second) <= tolerance:
        return 0.5
    return 1.0 if first > second else 0.0
