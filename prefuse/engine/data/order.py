"""A deterministic, resumable order of batches.

The permutation of an epoch depends only on (seed, epoch), so a run restored from `state_dict()` (a few ints) sees
exactly the batches the interrupted run would have seen next.
"""
from __future__ import annotations

from typing import Iterator, Sized

import torch


class PairBatches:
    """Batches of example indices: `for indices in PairBatches(len(examples), batch_size=8, seed=0): ...`.

    Each epoch is a fresh permutation (`shuffle=False`: the data's order) cut into batches of `batch_size`; the last
    short batch is kept unless `drop_last`. Iterating yields the rest of the current epoch; once it has been served in
    full, the next `iter()` starts the next epoch. `state_dict()` taken after receiving k batches of an epoch restores
    to the batch k + 1."""

    def __init__(self, examples: int | Sized, batch_size: int, seed: int = 0, epoch: int = 0,
                 drop_last: bool = False, shuffle: bool = True):
        self.num_examples = examples if isinstance(examples, int) else len(examples)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.seed, self.drop_last, self.shuffle = batch_size, seed, drop_last, shuffle
        self.epoch, self.position = epoch, 0  # position: batches of this epoch already handed out

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def epoch_order(self, epoch: int) -> list[int]:
        """The example indices of `epoch` in the order they are served."""
        if not self.shuffle:
            return list(range(self.num_examples))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= len(self):  # the current epoch was served in full: start the next one
            self.epoch, self.position = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1  # counted before the yield: a state taken now resumes after this batch
            yield order[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size, "drop_last": int(self.drop_last),
                "shuffle": int(self.shuffle)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`; the seed, data size and batching must match, or the order would silently differ."""
        if state.get("kind", "random") != "random":
            raise ValueError(f"cannot resume: the checkpoint's batches were drawn by --sampling_strategy "
                             f"{state['kind']}, this run uses random")
        for key in ("seed", "num_examples", "batch_size", "drop_last", "shuffle"):
            mine = int(getattr(self, key))
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume: saved {key}={state[key]} but this run has {key}={mine}")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"cannot resume: position {state['position']} outside 0..{len(self)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def held_out_split(n_examples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(held-out indices, training indices), each sorted: round(fraction * n) examples (at least 1) drawn by the
    seed, the same for every run with that seed."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = max(1, round(fraction * n_examples))
    return sorted(order[:n_eval]), sorted(order[n_eval:])


class PriorityBatches:
    """A-LoL's `good_priority` order: every batch draws `batch_size` example indices with replacement, example i
    with probability weights[i]+ / sum(weights+) (the authors' sampler); examples of weight <= 0 are never drawn.

    Same interface as PairBatches. An "epoch" is ceil(#positive / batch_size) batches, the positive subset's worth
    (the authors scale max_steps by the positive fraction the same way). The draws come from one torch.Generator
    seeded by `seed`; `state_dict()` holds its state, so a restored order draws exactly the batches the interrupted
    one would have drawn next."""

    def __init__(self, weights, batch_size: int, seed: int = 0):
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not torch.isfinite(weights).all():
            raise ValueError(f"good_priority: advantage {int((~torch.isfinite(weights)).nonzero()[0])} is not finite")
        self.weights = weights.clamp(min=0)
        self.positive = int((self.weights > 0).sum())
        if self.positive == 0:
            raise ValueError("sampling_strategy: good_priority draws examples of positive advantage, and no example "
                             "has one; use --sampling_strategy random")
        self.num_examples, self.batch_size, self.seed = len(weights), batch_size, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position = 0, 0

    @property
    def positive_fraction(self) -> float:
        return self.positive / self.num_examples

    def __len__(self) -> int:
        return -(-self.positive // self.batch_size)

    def draw(self) -> list[int]:
        return torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            self.position += 1  # counted before the yield, as PairBatches does
            yield self.draw()

    def _digest(self) -> str:
        import hashlib

        return hashlib.sha256(self.weights.numpy().tobytes()).hexdigest()[:16]

    def state_dict(self) -> dict:
        return {"kind": "good_priority", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": self.num_examples, "batch_size": self.batch_size, "weights": self._digest(),
                "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state`; the sampling, data size, batching and advantages must match."""
        if state.get("kind") != "good_priority":
            raise ValueError("cannot resume: the checkpoint's batches were drawn by --sampling_strategy random, this "
                             "run uses good_priority")
        for key, mine in (("seed", self.seed), ("num_examples", self.num_examples),
                          ("batch_size", self.batch_size), ("weights", self._digest())):
            if state[key] != mine:
                what = "advantages" if key == "weights" else key
                raise ValueError(f"cannot resume: saved {what}={state[key]} but this run has {what}={mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.generator.set_state(torch.as_tensor(state["rng"], dtype=torch.uint8))
