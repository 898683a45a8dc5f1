"""Rule-based judges for toy tasks: a plain `fn(prompt, completion) -> float` per example, and the copy task.

    judge = RuleJudge(copy_reward)
    judge.score(["repeat: a b c ="], ["a b d"])        # tensor([0.6667])

The copy task: the prompt `repeat: <words> =` asks for the words again; the reward is the fraction of positions
copied right, over the longer of the two (so a missing word and an extra word each cost one position).
"""
from __future__ import annotations

import random
from typing import Callable

import torch

from prefuse.engine.judges.base import JudgeError, as_scores, bradley_terry, check_rows, is_conversation

COPY_PREFIX, COPY_END = "repeat:", "="


class RuleJudge:
    """score = fn(prompt, completion) per example (columns are not passed); compare = Bradley-Terry,
    sigmoid(score(first) - score(second)): 1/2 on a tie."""

    def __init__(self, fn: Callable[[object, str], float], name: str | None = None):
        self.fn, self.name = fn, name or getattr(fn, "__name__", type(fn).__name__)

    def score(self, prompts: list, completions: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, completions, columns)
        return as_scores([self.fn(p, c) for p, c in zip(prompts, completions)], len(prompts), f"judge: {self.name}")

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        check_rows(prompts, first, columns)
        check_rows(prompts, second, {})
        return bradley_terry(self.score(prompts, first), self.score(prompts, second))


def copy_words(prompt) -> list[str]:
    """The words a copy prompt asks for: `repeat: a b c =` -> [a, b, c] (a message list: its last message)."""
    text = prompt[-1]["content"] if is_conversation(prompt) else prompt
    body = text.strip() if isinstance(text, str) else ""
    if not (body.startswith(COPY_PREFIX) and body.endswith(COPY_END)):
        raise JudgeError(f"judge: copy: prompt {text!r} is not '{COPY_PREFIX} <words> {COPY_END}'")
    return body[len(COPY_PREFIX):-len(COPY_END)].split()


def copy_reward(prompt, completion: str) -> float:
    """The fraction of positions copied right, over max(len(words), len(answer)): 1.0 only for an exact copy."""
    words, answer = copy_words(prompt), completion.split()
    longer = max(len(words), len(answer))
    return sum(a == b for a, b in zip(words, answer)) / longer if longer else 1.0


def copy_prompts(n: int, length: int = 3, vocabulary: str = "abcdefgh", seed: int = 0) -> list[str]:
    """n copy prompts of `length` words drawn from `vocabulary`'s letters, the same for the same seed."""
    rng = random.Random(seed)
    return [f"{COPY_PREFIX} {' '.join(rng.choice(vocabulary) for _ in range(length))} {COPY_END}" for _ in range(n)]


RULE_JUDGES: dict[str, Callable[[], RuleJudge]] = {"copy": lambda: RuleJudge(copy_reward, "copy")}
