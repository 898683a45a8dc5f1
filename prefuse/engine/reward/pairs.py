"""The data of `prefuse train-rm`: preference rows -> the token ids the judges read -> padded batches.

    pairs = load_reward_pairs("pairs.jsonl", tokenizer, kind="bradley_terry", max_length=1024)
    train, held_out = load_splits(cfg, tokenizer)        # a RewardModelConfig's dataset_name and held-out pairs
    batch = collate_pair_batch(pairs, indices, pad_id)   # input_ids, attention_mask [2B, T]: firsts, then seconds
    source = PairSource(pairs, batch_size=8, seed=0, pad_id=pad_id)   # a BatchSource of `pair_batch`es

Every example is two sequences, `first` and `second`, and the model should give `first` the higher logit:

    bradley_terry   first = reward_model_ids(prompt, chosen), second = reward_model_ids(prompt, rejected)
    pairwise        first = pairwise_ids(prompt, chosen, rejected) (target 1),
                    second = pairwise_ids(prompt, rejected, chosen) (target 0)

These are the judges' own text builders (`engine/judges/models.py`), so `RewardModelJudge` and `PairwiseJudge` read
text exactly as the model was trained on it. A conversational response of several messages is scored as TRL's
RewardTrainer does, prompt + response through the chat template: its earlier messages join that side's prompt.

max_length, as in TRL's RewardTrainer: a pair with a sequence over max_length tokens is dropped, not truncated. The
judges score whole texts; a model trained on texts cut short would be judged on texts it never saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from prefuse.engine.data import (BadRow, DataError, SkippedRows, collate_sequences, detect_format, held_out_split,
                                 load_records)
from prefuse.engine.data.formats import NEEDED_COLUMNS, PAIRED_FORMATS, RowIssue, split_row
from prefuse.engine.data.errors import WHERE_COLUMN
from prefuse.engine.data.loading import row_problem
from prefuse.engine.core.sources import Batch, ShuffledSource
from prefuse.engine.judges.base import is_conversation, plain_prompt
from prefuse.engine.judges.models import pairwise_ids, reward_model_ids

KINDS = ("bradley_terry", "pairwise")


@dataclass(kw_only=True)
class RewardPairs:
    """first[i], second[i]: the token ids of pair i's two sequences (module docstring); where[i]: `<file>:<row>`;
    dropped: pairs left out for a sequence over max_length; skipped: bad rows left out (skip_bad_rows)."""

    kind: str
    first: list[list[int]]
    second: list[list[int]]
    where: list[str]
    dropped: int = 0
    skipped: SkippedRows = field(default_factory=SkippedRows)

    def __len__(self) -> int:
        return len(self.first)

    def subset(self, indices: list[int]) -> "RewardPairs":
        return RewardPairs(kind=self.kind, first=[self.first[i] for i in indices],
                           second=[self.second[i] for i in indices], where=[self.where[i] for i in indices],
                           dropped=self.dropped, skipped=self.skipped)


def _response_text(response) -> str:
    """A response as the text a pairwise judge compares: a string as it is, one message as its content."""
    if isinstance(response, str):
        return response
    return response[-1]["content"] if len(response) == 1 else plain_prompt(response).rstrip("\n")


def _bradley_terry_ids(tokenizer, prompt, response) -> list[int]:
    if isinstance(response, str):
        return reward_model_ids(tokenizer, prompt, response)
    # messages: the earlier turns of a multi-message response belong to this side's conversation
    return reward_model_ids(tokenizer, list(prompt) + list(response[:-1]), response[-1]["content"])


def pair_ids(tokenizer, kind: str, prompt, chosen, rejected) -> tuple[list[int], list[int]]:
    """The (first, second) token ids of one pair (module docstring); chosen / rejected: strings, or message lists
    ending with the assistant's response."""
    if kind == "bradley_terry":
        return _bradley_terry_ids(tokenizer, prompt, chosen), _bradley_terry_ids(tokenizer, prompt, rejected)
    if kind == "pairwise":
        chosen, rejected = _response_text(chosen), _response_text(rejected)
        return pairwise_ids(tokenizer, prompt, chosen, rejected), pairwise_ids(tokenizer, prompt, rejected, chosen)
    raise ValueError(f"kind: {kind!r} is not one of {KINDS}")


def load_reward_pairs(path, tokenizer, *, kind: str, max_length: int | None, split: str = "train",
                      skip_bad_rows: bool = False) -> RewardPairs:
    """The pairs of a local file or saved dataset (any paired TRL format) as `RewardPairs`. A bad row raises
    BadRow (`<file>:<row>: field '<name>': <what>`) or, with skip_bad_rows, is left out and tallied; DataError when
    the data is not paired, or when max_length leaves no pair."""
    records = load_records(path, split=split)
    fmt = detect_format(records)
    if fmt not in PAIRED_FORMATS:
        raise DataError(f"{path}: a reward model learns from pairs, with columns {NEEDED_COLUMNS['pairs']}; this "
                        f"data is in the {fmt} format")
    pairs, skipped = RewardPairs(kind=kind, first=[], second=[], where=[]), SkippedRows()
    for number, row in enumerate(records, start=1):
        where = row.get(WHERE_COLUMN) or f"{path}:{number}"
        problem = row_problem(row)
        if problem is None:
            try:
                parts = split_row(row, fmt)
                first, second = _pair_ids_of_row(tokenizer, kind, parts)
            except RowIssue as issue:
                problem = issue.problem
        if problem is not None:
            if not skip_bad_rows:
                raise BadRow(where, problem)
            skipped.add(where, problem)
            continue
        if max_length is not None and max(len(first), len(second)) > max_length:
            pairs.dropped += 1
            continue
        pairs.first.append(first)
        pairs.second.append(second)
        pairs.where.append(where)
    pairs.skipped = skipped
    if not pairs.first:
        kept = len(records) - skipped.count
        why = (f"all {kept} pairs have a sequence over max_length={max_length} tokens (raise --max_length)"
               if kept else "no pair is left after the bad rows")
        raise DataError(f"{path}: {why}")
    return pairs


def _pair_ids_of_row(tokenizer, kind: str, parts) -> tuple[list[int], list[int]]:
    chosen, rejected = parts.completions["chosen"], parts.completions["rejected"]
    try:
        return pair_ids(tokenizer, kind, parts.prompt, chosen, rejected)
    except Exception as error:  # strict chat templates reject conversations with any exception
        if isinstance(chosen, str) and not is_conversation(parts.prompt):
            raise
        raise RowIssue("chat_template", "prompt", f"chat template: {' '.join(str(error).split())}") from error


def collate_pair_batch(pairs: RewardPairs, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask [2B, T] of the pairs `indices`, right-padded with pad_id: rows 0..B-1 their first
    sequences, rows B..2B-1 their second ones (one forward for both, as TRL's RewardTrainer runs chosen and
    rejected)."""
    batch = pair_batch(pairs, indices, pad_id)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


def pair_batch(pairs: RewardPairs, indices: list[int], pad_id: int) -> Batch:
    """The Batch of the pairs `indices` (collate_pair_batch's rows; roles first: rows 0..B-1, second: B..2B-1;
    no response labels: a reward model reads whole sequences)."""
    sequences = [pairs.first[i] for i in indices] + [pairs.second[i] for i in indices]
    padded = collate_sequences(sequences, [[] for _ in sequences], pad_id)
    n = len(indices)
    return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                 roles={"first": torch.arange(n), "second": torch.arange(n, 2 * n)},
                 index=torch.tensor(indices, dtype=torch.long))


class PairSource(ShuffledSource):
    """The training pairs as a BatchSource: PairBatches' resumable shuffled order, epoch after epoch."""

    def __init__(self, pairs: RewardPairs, *, batch_size: int, seed: int, pad_id: int):
        super().__init__(len(pairs), batch_size=batch_size, seed=seed)
        self.pairs, self.pad_id = pairs, pad_id

    def batch(self, indices: list[int]) -> Batch:
        return pair_batch(self.pairs, indices, self.pad_id)


def walk_pairs(pairs: RewardPairs, *, batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Every pair once, in order, in batches of batch_size (the held-out set)."""
    for begin in range(0, len(pairs), batch_size):
        yield pair_batch(pairs, list(range(begin, min(begin + batch_size, len(pairs)))), pad_id)


def load_splits(cfg, tokenizer) -> tuple[RewardPairs, RewardPairs | None]:
    """The training pairs and the held-out ones of a RewardModelConfig: eval_split (a file, or a split of a saved
    dataset folder), or eval_fraction of the training pairs drawn by the seed."""
    def load(path, **extra):
        return load_reward_pairs(path, tokenizer, kind=cfg.kind, max_length=cfg.max_length,
                                 skip_bad_rows=cfg.skip_bad_rows, **extra)

    train, held_out = load(cfg.dataset_name), None
    if cfg.eval_split:
        held_out = (load(cfg.eval_split) if Path(cfg.eval_split).exists()
                    else load(cfg.dataset_name, split=cfg.eval_split))
    elif cfg.eval_fraction:
        held_indices, train_indices = held_out_split(len(train), cfg.eval_fraction, cfg.seed)
        if not train_indices:
            raise ValueError(f"eval_fraction: {cfg.eval_fraction} of {len(train)} pairs leaves none to train on")
        held_out, train = train.subset(held_indices), train.subset(train_indices)
    return train, held_out


__all__ = ["KINDS", "RewardPairs", "PairSource", "collate_pair_batch", "load_reward_pairs", "load_splits",
           "pair_batch", "pair_ids", "walk_pairs"]
