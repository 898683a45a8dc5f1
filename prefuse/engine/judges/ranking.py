"""Ranking a few candidate responses of each prompt with any judge: the best and the worst of them.

    wins, scores = judge_candidates(judge, prompts, candidates, columns=columns)   # wins [N, n, n] = P(a > b)
    best, worst = best_and_worst(wins, scores)                                      # [N] each; equal: all tied

A scoring judge (reward functions, a reward model, a vision-language or rule judge) scores every candidate once;
P(a > b) = sigmoid(score(a) - score(b)), after the missing-EOS penalty where one is given (TRL's online trainers).
A pairwise preference model compares every pair (a round robin, as PairRM ranks), each candidate's strength the
sum of its P(a > b), and gives no scores. Online (engine/online/source.py: judged pairs, best-of-n, SELM's {y_1, y_2,
y_ref}) and offline (engine/methods/selm.py: SELM's {y_w, y_l, y_ref}) rank through these two functions.
"""
from __future__ import annotations

import torch

from prefuse.engine.judges.models import PairwiseJudge


def is_pairwise(judge) -> bool:
    """Whether the judge only compares (a pairwise preference model)."""

    return isinstance(getattr(judge, "judge", judge), PairwiseJudge)


def judge_candidates(judge, prompts: list, candidates: list[list[str]], *, columns: dict | None = None,
                     contains_eos: list[list[bool]] | None = None, missing_eos_penalty: float | None = None,
                     pairwise: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prompts [N]; candidates: N lists of n texts; columns: the judge's columns, N values each -> (wins [N, n, n]
    with wins[i, a, b] = P(a > b) and 1/2 on the diagonal, scores [N, n] or None for a pairwise judge)."""
    n = len(candidates[0])
    columns = columns or {}
    pairwise = is_pairwise(judge) if pairwise is None else pairwise

    def repeated(k: int) -> dict:
        return {name: [v for v in values for _ in range(k)] for name, values in columns.items()}

    if not pairwise:
        scores = judge.score([p for p in prompts for _ in range(n)], [c for cs in candidates for c in cs],
                             **repeated(n)).float().view(-1, n)
        unscored = torch.isnan(scores).flatten().nonzero().flatten().tolist()
        if unscored:  # a pair cannot be ranked on NaN, and a NaN reward would reach the loss silently
            raise ValueError(f"reward_funcs: no reward function scored sample(s) {unscored[:5]} of this batch "
                             f"(every one returned None); return a number for every completion")
        if missing_eos_penalty is not None:
            ended = torch.tensor(contains_eos, dtype=torch.bool).view(-1, n)
            scores = scores - missing_eos_penalty * (~ended).float()
        return torch.sigmoid(scores.unsqueeze(-1) - scores.unsqueeze(-2)), scores
    pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
    probs = judge.compare([p for p in prompts for _ in pairs], [cs[a] for cs in candidates for a, _ in pairs],
                          [cs[b] for cs in candidates for _, b in pairs],
                          **repeated(len(pairs))).float().view(len(prompts), len(pairs))
    wins = torch.full((len(prompts), n, n), 0.5)
    for j, (a, b) in enumerate(pairs):
        wins[:, a, b], wins[:, b, a] = probs[:, j], 1 - probs[:, j]
    return wins, None


def best_and_worst(wins: torch.Tensor, scores: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best [N], worst [N]) by score, or by the sum of P(a > b) without scores. The first drawn wins a tie for
    best and the last a tie for worst, so two tied candidates make the pair (first, second) as TRL's online DPO
    does; best == worst only where every candidate ties."""
    strength = scores if scores is not None else wins.sum(-1)
    n = strength.shape[1]
    best = strength.argmax(-1)
    worst = n - 1 - strength.flip(-1).argmin(-1)
    tied = (strength == strength[:, :1]).all(-1)
    return best, torch.where(tied, best, worst)
