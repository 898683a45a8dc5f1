"""Rollouts of the toy environment: the policy's responses (through `engine/online/rollout.py`), then the customer's
decision, the world model's outcome and the evaluator's ratings of each dialogue under every feedback.

    responses = sample_responses(model, tokenizer, scenarios, samples=2, seed=0)   # [scenario][sample] texts
    dialogues = play(scenarios, [r[0] for r in responses], customer, world_model, evaluator)

Sampling is batched over scenarios, seeded per batch (seed + batch index), so the same seed and weights give the same
responses; a response is the text generated up to its first EOS, decoded without special tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prefuse.engine.data.tokenize import tokenize_prompt_texts
from prefuse.engine.methods.rlhs.environment import (
    Scenario,
    deceptive,
    false_claims,
    parse_response,
    policy_prompt,
    true_utility,
)
from prefuse.engine.methods.rlhs.parties import FEEDBACK, Customer, Evaluator, WorldModel, evaluator_view
from prefuse.engine.models.loading import Models
from prefuse.engine.online.rollout import RolloutConfig, sample_policy


@dataclass(kw_only=True)
class Dialogue:
    """One consultation played out: the response, the customer's decision, the world model's outcome, the true
    utility, and the evaluator's rating and view under each feedback."""

    scenario: Scenario
    response: str
    decision: str
    outcome: str | None
    utility: float
    deceptive: bool
    false_claims: int
    recommended: str | None
    views: dict[str, str] = field(default_factory=dict)
    ratings: dict[str, float] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return policy_prompt(self.scenario)


def generate_texts(model, tokenizer, prompts: list[str], *, samples: int = 1, seed: int = 0,
                   temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 24,
                   batch_size: int = 64) -> list[list[str]]:
    """Per prompt (plain text, tokenized with the tokenizer's special tokens as training tokenizes it) `samples`
    completions of a causal LM: `engine.rollout.sample_policy`, greedy at temperature 0."""

    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    cfg = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        num_generations=samples).validate()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer: it has neither a pad nor an EOS token (set pad_token)")
    models = Models(policy=model, reference=None, tokenizer=tokenizer)
    out: list[list[str]] = []
    for number, start in enumerate(range(0, len(prompts), batch_size)):
        ids = tokenize_prompt_texts(tokenizer, prompts[start:start + batch_size], True)
        drawn = sample_policy(models, ids, cfg, seed=seed + number, eos_id=tokenizer.eos_token_id, pad_id=pad_id)
        texts = tokenizer.batch_decode(drawn.completion_ids, skip_special_tokens=True)
        out += [texts[i:i + samples] for i in range(0, len(texts), samples)]
    return out


def sample_responses(model, tokenizer, scenarios: list[Scenario], *, samples: int = 2, seed: int = 0,
                     temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 24,
                     batch_size: int = 64) -> list[list[str]]:
    """`samples` independent responses of the policy per scenario, from the same prompt."""
    return generate_texts(model, tokenizer, [policy_prompt(s) for s in scenarios], samples=samples, seed=seed,
                          temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)


def play(scenarios: list[Scenario], responses: list[str], customer: Customer, world_model: WorldModel | None,
         evaluator: Evaluator | None, feedbacks: tuple[str, ...] = FEEDBACK) -> list[Dialogue]:
    """Each (scenario, response) played out: the customer decides, the world model writes the outcome (when a
    hindsight feedback is asked for), the evaluator rates the view of each feedback in `feedbacks` (none without an
    evaluator)."""
    decisions = customer.decide(scenarios, responses)
    hindsight = any(f != "immediate" for f in feedbacks)
    outcomes = (world_model.outcomes(scenarios, decisions) if hindsight and world_model is not None
                else [None] * len(scenarios))
    dialogues = []
    for s, text, decision, outcome in zip(scenarios, responses, decisions, outcomes, strict=True):
        parsed = parse_response(text)
        dialogues.append(Dialogue(scenario=s, response=text, decision=decision, outcome=outcome,
                                  utility=true_utility(s, decision), deceptive=deceptive(s, parsed),
                                  false_claims=len(false_claims(s, parsed)), recommended=parsed.recommended))
    if evaluator is not None:
        for feedback in feedbacks:
            views = [evaluator_view(d.scenario, d.response, d.decision, d.outcome, feedback) for d in dialogues]
            for d, view, rating in zip(dialogues, views, evaluator.rate(views), strict=True):
                d.views[feedback], d.ratings[feedback] = view, float(rating)
    return dialogues
