"""Batch sources: where a training step's sequences come from, behind one small interface.

    source = OfflineSource(data, needs, batch_size=8, seed=0, pad_id=0)
    batch = source.next_batch()          # a Batch: sequences [S, T], roles {role: rows}, pass-through inputs [B]
    state = source.state_dict()          # resumable: the next batch after load_state_dict(state) is the same

A `BatchSource` has `next_batch()`, `state_dict()`, `load_state_dict()`, `epoch` and `batches_per_epoch`; the
online source (generate -> judge -> build) plugs in beside `OfflineSource`; `ShuffledSource` is the resumable
shuffled order under OfflineSource and `prefuse train-rm`'s pairs (engine/reward/pairs.py:PairSource).
`batches(data, needs, ...)` walks a data set once in order (evaluation, the reference cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from prefuse.engine.data import PairBatches, TokenizedData, collate_sequences, vision_inputs
from prefuse.algorithms.srpo import CONTEXT_PAIRS
from prefuse.engine.core.objectives import ObjectiveNeeds

# the example keys an SRPO role's row reads (build_batch): its revision prompt, holding the context answer, and the
# answer (engine/methods/srpo.py writes them)
ROLE_PROMPT = {role: f"{role.split('_given_')[1]}_context_ids" for role in CONTEXT_PAIRS}
ROLE_RESPONSE = {role: f"{role}_ids" for role in CONTEXT_PAIRS}


@dataclass(kw_only=True)
class Batch:
    """input_ids, attention_mask, labels [S, T] (labels in the next-token layout, -100 off the responses); roles:
    {role: row indices [B]}; inputs: pass-through objective inputs [B] (rewards, labels, ...); index [B]: the
    examples' positions in their data set (or prompt set); metrics: numbers about how the batch was made (an
    online source's judge scores), logged with the step's; vision: a vision-language model's inputs for the rows'
    images (`data.vision_inputs`: pixel_values [n_images, ...] in row order, ...), {} for text; temperature [S]:
    the temperature each sequence's log-probs are read at (an online source's samples at the temperature they were
    drawn at, where the loss reads that distribution; offline rows at 1), None: the head's own for every row."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    roles: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    index: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # what made the batch (rollout scores, ...), logged
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values of the rows' images, ...
    temperature: torch.Tensor | None = None  # [S] per sequence, or None
    per_token: bool = False  # the step's loss is a mean over the trained tokens (SFT), not over the examples

    @property
    def n_examples(self) -> int:
        return int(next(iter(self.roles.values())).shape[0])

    @property
    def loss_units(self) -> int:
        """What the step's loss is a mean over: the trained tokens (labels not -100) of a per_token batch (SFT),
        else the examples; the loop weighs each micro-batch's loss by its share of the optimizer step's units (a
        rank's share of a global batch counts its own)."""
        return int((self.labels != -100).sum()) if self.per_token else self.n_examples

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        move = {k: v.to(device) for k, v in self.roles.items()}
        return Batch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                     labels=self.labels.to(device), roles=move,
                     inputs={k: v.to(device) for k, v in self.inputs.items()},
                     index=None if self.index is None else self.index.to(device), metrics=self.metrics,
                     vision={k: v.to(device) for k, v in self.vision.items()},
                     temperature=None if self.temperature is None else self.temperature.to(device),
                     per_token=self.per_token)


class BatchSource(Protocol):
    batches_per_epoch: int

    def next_batch(self) -> Batch: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    @property
    def epoch(self) -> float: ...


# the response of each role in a paired example
PAIR_RESPONSE = {"chosen": "chosen_ids", "rejected": "rejected_ids", "sample": "reference_ids",
                 "online_rejected": "generated_rejected_ids", **ROLE_RESPONSE}  # Avg-DPO's y~- (generated_rejected)


def _mean_reward(data: TokenizedData) -> float:
    rewards = [e["reward"] for e in data.examples if "reward" in e]
    return sum(rewards) / len(rewards) if rewards else 0.0


def build_batch(examples: list[dict], indices: list[int], needs: ObjectiveNeeds, *, pad_id: int,
                max_length: int | None = None, baseline: float = 0.0) -> Batch:
    """The sequences of `examples` for the roles `needs` names, role after role (role r's rows are
    [r * B, (r + 1) * B)), and their pass-through inputs. KTO's `kl` role pairs each prompt with the previous
    example's completion, cut to max_length. baseline: subtracted from rewards where advantages are not given."""
    n = len(examples)
    prompts, responses, roles = [], [], {}
    for number, role in enumerate(needs.roles):
        if role == "kl":
            for i, example in enumerate(examples):
                completion = examples[i - 1]["completion_ids"]
                room = len(completion) if max_length is None else max(max_length - len(example["prompt_ids"]), 1)
                prompts.append(example["prompt_ids"])
                responses.append(completion[:room])
        else:
            key = "completion_ids" if role == "completion" else PAIR_RESPONSE[role]
            # SRPO's <answer>_given_<context> rows start with their revision prompt (engine/methods/srpo.py)
            prompts += [e[ROLE_PROMPT.get(role, "prompt_ids")] for e in examples]
            responses += [e[key] for e in examples]
        roles[role] = torch.arange(number * n, (number + 1) * n)
    sequences = collate_sequences(prompts, responses, pad_id)
    # every role's row of an example gets the example's images (vision-language data: data/images.py)
    vision = vision_inputs([e.get("images") for e in examples] * len(needs.roles)) if "images" in examples[0] else {}
    inputs = {}
    if "labels" in needs.inputs:
        inputs["labels"] = torch.tensor([bool(e["label"]) for e in examples])
    if "rewards" in needs.inputs:
        inputs["rewards"] = torch.tensor([float(e["reward"]) for e in examples])
    if "advantages" in needs.inputs:
        inputs["advantages"] = torch.tensor([float(e["advantage"]) if "advantage" in e
                                             else float(e["reward"]) - baseline for e in examples])
    if "preference_probs" in needs.inputs:
        inputs["preference_probs"] = torch.tensor([float(e["preference_prob"]) for e in examples])
    return Batch(input_ids=sequences["input_ids"], attention_mask=sequences["attention_mask"],
                 labels=sequences["labels"], roles=roles, inputs=inputs, index=torch.tensor(indices, dtype=torch.long),
                 vision=vision)


class ShuffledSource:
    """Batches of a data set's indices in a resumable shuffled order (PairBatches', epoch after epoch, or another
    order with its interface); a subclass's `batch(indices)` says what a Batch of those examples is."""

    def __init__(self, size: int, *, batch_size: int, seed: int, order=None):
        self.order = PairBatches(size, batch_size=batch_size, seed=seed) if order is None else order
        self.batches_per_epoch = len(self.order)
        self._iter = iter(self.order)

    def batch(self, indices: list[int]) -> Batch:
        raise NotImplementedError

    def next_batch(self) -> Batch:
        indices = next(self._iter, None)
        if indices is None:  # the epoch is done: PairBatches starts the next one
            self._iter = iter(self.order)
            indices = next(self._iter)
        return self.batch(indices)

    @property
    def epoch(self) -> float:
        """Epochs served so far, as a float (TRL's `epoch`)."""
        return self.order.epoch + self.order.position / max(len(self.order), 1)

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self._iter = iter(self.order)


class OfflineSource(ShuffledSource):
    """Batches of a tokenized data set in a resumable shuffled order (epoch after epoch); `order`: another order
    with PairBatches' interface (A-LoL's good_priority draws, `engine/data/order.py:PriorityBatches`)."""

    def __init__(self, data: TokenizedData, needs: ObjectiveNeeds, *, batch_size: int, seed: int, pad_id: int,
                 max_length: int | None = None, order=None):
        super().__init__(len(data), batch_size=batch_size, seed=seed, order=order)
        self.data, self.needs, self.pad_id, self.max_length = data, needs, pad_id, max_length
        self.baseline = _mean_reward(data)

    def batch(self, indices: list[int]) -> Batch:
        return build_batch([self.data.examples[i] for i in indices], indices, self.needs, pad_id=self.pad_id,
                           max_length=self.max_length, baseline=self.baseline)


def batches(data: TokenizedData, needs: ObjectiveNeeds, *, batch_size: int, pad_id: int,
            max_length: int | None = None, baseline: float | None = None) -> Iterator[Batch]:
    """Every example of `data` once, in order, as batches of `batch_size`."""
    baseline = _mean_reward(data) if baseline is None else baseline
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        yield build_batch([data.examples[i] for i in indices], indices, needs, pad_id=pad_id, max_length=max_length,
                          baseline=baseline)
