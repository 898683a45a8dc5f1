"""What every judge shares: the `Judge` interface, `JudgeError`, and the checks of a call's rows and scores."""
from __future__ import annotations

import math
import numbers
import reprlib
from typing import Protocol, runtime_checkable

import torch


class JudgeError(ValueError):
    """A judge that cannot be built or a call it cannot answer; the message is one line naming the flag and the fix."""


@runtime_checkable
class Judge(Protocol):
    """Scores completions of prompts, or compares two completions of each prompt.

    prompts [N]: strings or chat message lists (TRL's conversational format); completions, first, second [N]: the
    sampled texts; columns: the dataset's other columns, lists of N per-example values (non-lists pass as they are).
    Both return float32 tensors [N] on the CPU."""

    def score(self, prompts: list, completions: list[str], **columns) -> torch.Tensor:
        """[N] scores, higher is better."""
        ...

    def compare(self, prompts: list, first: list[str], second: list[str], **columns) -> torch.Tensor:
        """[N] P(first > second) in [0, 1]."""
        ...


def is_conversation(prompt) -> bool:
    """TRL's `is_conversational` for one prompt: a list of {"role", "content"} messages."""
    return isinstance(prompt, list) and bool(prompt) and all(isinstance(m, dict) and "role" in m for m in prompt)


def plain_prompt(prompt) -> str:
    """A prompt as plain text: a string as it is; a message list as "role: content" lines (for tokenizers without a
    chat template, and for the pairwise template)."""
    if is_conversation(prompt):
        return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\n"
    return prompt


def check_rows(prompts: list, completions: list, columns: dict) -> None:
    """One completion per prompt, and N entries in every list column."""
    n = len(prompts)
    if len(completions) != n:
        raise JudgeError(f"judge: {len(completions)} completions for {n} prompts (pass one completion per prompt)")
    for name, values in columns.items():
        if isinstance(values, (list, tuple)) and len(values) != n:
            raise JudgeError(f"judge: column {name!r} has {len(values)} entries for {n} completions "
                             f"(pass one value per completion, or a non-list to share one)")


def as_scores(values, n: int, who: str, abstain: bool = False) -> torch.Tensor:
    """A reward source's output as float32 [n]; JudgeError (`{who} returned ...`) for a wrong count, a non-numeric or a
    non-finite score. abstain: None is allowed and becomes NaN (TRL: "no reward for this completion")."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):  # a tensor or an ndarray
        values = values.tolist()
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise JudgeError(f"{who} returned {type(values).__name__}, not a list of {n} scores "
                         f"(return one float per completion)")
    values = list(values)
    if len(values) != n:
        raise JudgeError(f"{who} returned {len(values)} scores for {n} completions (return one float per completion)")
    scores = []
    for i, value in enumerate(values):
        if value is None and abstain:
            scores.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):
            hint = "a float, or None to abstain" if abstain else "a float"
            raise JudgeError(f"{who} returned {reprlib.repr(value)} ({type(value).__name__}) for completion {i} "
                             f"(return {hint})")
        if not math.isfinite(value):
            hint = "a finite float, or None to abstain" if abstain else "a finite float"
            raise JudgeError(f"{who} returned {float(value)} for completion {i} (return {hint})")
        scores.append(float(value))
    return torch.tensor(scores, dtype=torch.float32)


def bradley_terry(first_scores: torch.Tensor, second_scores: torch.Tensor) -> torch.Tensor:
    """P(first > second) = sigmoid(score(first) - score(second))."""
    return torch.sigmoid(first_scores - second_scores)


def doubled(columns: dict) -> dict:
    """Columns for a call over first + second (2N rows): list columns repeated, others as they are."""
    return {k: list(v) * 2 if isinstance(v, (list, tuple)) else v for k, v in columns.items()}
