"""The data of a data-parallel run: each rank's share of every global batch (engine/train/distributed.py).

    batch = shard_batch(global_batch, rank, size)     # rank's examples: rows of every role, inputs, indices
    source = ShardedSource(offline_source, world)      # rank's share of each batch of a source of global batches
    online = shard_online(online_source, world)        # each rank samples its own share of every batch of prompts

A global batch holds ranks x per_device_train_batch_size examples, as one process with that batch size sees it;
rank r takes the contiguous share `shard_bounds` gives (sizes differ by at most one; `check_last_batch` refuses
an epoch whose last batch would leave a rank empty). The sequences keep the global batch's length, and roles that
pair examples inside a batch (KTO's `kl` completions) were formed over the global batch before it is split.
"""
from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from prefuse.engine.core.sources import Batch


class World(Protocol):
    """What sharding reads of the run's ranks (the torchrun world of `engine/train/distributed.py`)."""
    rank: int
    size: int

    @property
    def distributed(self) -> bool: ...

    def generation(self, sample): ...

__all__ = ["shard_bounds", "shard_batch", "ShardedSource", "ShardedOrder", "shard_online", "check_last_batch"]


def shard_bounds(n_examples: int, rank: int, size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous share of n examples: sizes differ by at most one, lower ranks larger."""
    base, extra = divmod(n_examples, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_batch(batch: Batch, rank: int, size: int) -> Batch:
    """Rank's share of a global batch: its examples (rows of every role), their pass-through inputs and indices;
    the sequences keep the global batch's length. ValueError when a rank would get no example."""
    n = batch.n_examples
    if n < size:
        raise ValueError(f"a global batch of {n} example(s) cannot be split over {size} ranks (each needs one)")
    if batch.vision:
        raise ValueError("images: offline batches with images are not split over ranks yet; train a "
                         "vision-language model in one process")
    start, stop = shard_bounds(n, rank, size)
    roles = {role: rows[start:stop] for role, rows in batch.roles.items()}
    kept = torch.unique(torch.cat([rows.reshape(-1) for rows in roles.values()]))  # sorted: the rows' order
    remap = {role: torch.searchsorted(kept, rows.reshape(-1)).view(rows.shape) for role, rows in roles.items()}

    def examples(value):
        return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value

    return dataclasses.replace(batch, input_ids=batch.input_ids[kept], attention_mask=batch.attention_mask[kept],
                               labels=batch.labels[kept], roles=remap,
                               inputs={k: examples(v) for k, v in batch.inputs.items()},
                               index=None if batch.index is None else batch.index[start:stop])


class ShardedOrder:
    """Rank's contiguous share of every batch of indices of an order (PairBatches' interface); position, epoch
    and state are the global order's."""

    def __init__(self, order, world: World):
        self.__dict__.update(order=order, world=world)

    def __getattr__(self, name):
        return getattr(self.order, name)

    def __setattr__(self, name, value):
        setattr(self.order, name, value)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for indices in self.order:
            start, stop = shard_bounds(len(indices), self.world.rank, self.world.size)
            yield indices[start:stop]


def shard_online(source, world: World, *, sharded: bool = False):
    """An online source (engine/online/source.py) whose ranks each sample their own prompts: its orders of prompts
    (built over global batches of ranks x per_device_train_batch_size prompts) give each rank its share of every
    global batch, and each rank's rollouts draw from a seed of its own. sharded (FSDP2): every batch is made
    inside `world.generation`, where the models are whole, with synced rollouts."""
    if not world.distributed:
        return source
    if sharded:
        source.rollout = dataclasses.replace(source.rollout, synced_gpus=True)
        make_batch = source.next_batch
        source.next_batch = lambda: world.generation(make_batch)
    for order in source.orders:
        check_last_batch(order.num_examples, order.batch_size, world, "per_device_train_batch_size")
    source.orders = [ShardedOrder(order, world) for order in source.orders]
    source.order, source._iter = source.orders[0], iter(source.orders[0])
    source.seed = source.seed + 7919 * world.rank  # the rollouts' seed: seed * 1_000_003 + batches served
    return source


class ShardedSource:
    """Rank's share of each batch of a source of global batches; state, epochs and counts are the global
    source's (the same on every rank), so a checkpoint resumes on any number of ranks with the same global
    batch."""

    def __init__(self, source, world: World):
        self.source, self.world = source, world
        self.batches_per_epoch = source.batches_per_epoch

    def __getattr__(self, name):  # baseline, order, ...: the global source's
        return getattr(self.source, name)

    def next_batch(self) -> Batch:
        return shard_batch(self.source.next_batch(), self.world.rank, self.world.size)

    @property
    def epoch(self) -> float:
        return self.source.epoch

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.source.load_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{error} (batch_size counts the global batch: per_device_train_batch_size x "
                             f"{self.world.size} ranks)") from None


def check_last_batch(n_examples: int, batch_size: int, world: World, name: str) -> None:
    """One line when an epoch's last global batch of `batch_size` would leave a rank without an example."""
    rest = n_examples % batch_size
    if world.distributed and 0 < rest < world.size:
        raise ValueError(f"{name}: the last global batch of an epoch ({n_examples} examples in batches of "
                         f"{batch_size // world.size} x {world.size} ranks) holds {rest} example(s) for "
                         f"{world.size} ranks; choose a batch size that leaves every rank at least one")
