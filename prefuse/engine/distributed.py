"""Multi-process training on PyTorch's own stack: the torchrun world, DDP, the sharded data order, the reductions.

    torchrun --nproc_per_node K -m prefuse train ...        # K ranks (WORLD_SIZE, RANK, LOCAL_RANK from torchrun)

    with launch() as world:                    # the process group torchrun describes (gloo on CPUs, NCCL on GPUs)
        source = ShardedSource(global_source, world)   # each rank's share of every global batch
        step = world.wrap(step, models)        # the step's forward under DDP
        with world.micro_batch(last):          # DDP's no_sync() on all but the last micro-batch
            ...
        world.total(n), world.sum_metrics(m)   # step-level sums over the ranks

What runs where:
- Data: every rank walks the same seeded order of global batches (K x per_device_train_batch_size examples, the
  batches one process with that batch size would see) and takes its contiguous share of each (`shard_batch`;
  uneven last batches split as evenly as possible, none left empty). The sequences keep the global batch's
  padding, and a role that pairs examples inside a batch (KTO's `kl` completions) is formed over the global batch.
- Normalization: the loop weighs each micro-batch's mean loss by its examples over the global step's examples
  (`total`), times K, because DDP averages gradients over the ranks: K ranks then apply exactly the update of one
  process on the same global batch.
- Objectives coupled across the batch (`spec.separable` False: KTO's KL reference point, `aot`'s sorting, GRPO's
  group statistics, anything normalized over the batch): `PreferenceLoss.batch_group` all-gathers every
  per-example input of the objective with autograd (`preference_parallel.gather_examples`), so the objective sees
  the global micro-batch; each rank's loss is then that global mean, whose gradient the gather's backward sums
  back to the rank's own rows from every rank (K times its share, which DDP's average divides out again).
- The model: prefuse never calls the model's forward (the decoder's last hidden states go through the fused head),
  and DDP reduces gradients only for a forward run through it; so DDP wraps the step itself (`StepModule`, whose
  only submodule is the policy): decoder, reference and the fused head on the lm_head all run inside DDP's forward
  and every trainable parameter's gradient (the lm_head's, tied or not) is all-reduced once by DDP's own hooks.
- I/O: only rank 0 writes metrics.jsonl, TensorBoard, checkpoints and prints; the others wait at a barrier after
  a checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from prefuse.engine.metrics import MetricsLog
from prefuse.engine.sources import Batch

__all__ = ["World", "launch", "current", "shard_batch", "ShardedSource", "StepModule", "check_last_batch",
           "RankLog"]


@dataclass
class World:
    """The ranks of a run. A single process is World() (rank 0 of 1): every method is then a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gather_group: object = None  # the group over which a batch's per-example statistics are all-gathered
    module: torch.nn.Module | None = None  # the DDP-wrapped step, once wrap() has run

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- the model ----------------------------------------------------------------------------------------------

    def wrap(self, step, policy: torch.nn.Module):
        """The step whose calls run through DDP's forward (StepModule); the step itself for one process."""
        if not self.distributed:
            return step
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters=False: every trainable parameter gets its gradient in every step (the fused head
        # gives the lm_head's); broadcast_buffers=False: the buffers (rotary frequencies) never change
        self.module = DistributedDataParallel(StepModule(step, policy), broadcast_buffers=False,
                                              device_ids=None)
        step.loss_fn.batch_group = self.gather_group
        return DataParallelStep(step, self.module)

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are synchronized only on the last one
        of an optimizer step (DDP's no_sync() on the others)."""
        if self.module is None or last:
            return contextlib.nullcontext()
        return self.module.no_sync()

    # -- reductions ---------------------------------------------------------------------------------------------

    def total(self, value: int | float) -> float:
        """The sum of `value` over the ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return type(value)(tensor.item())

    def sum_metrics(self, *values: dict):
        """Each dict's sums over the ranks, key by key (a key some ranks lack counts 0 there): one dict for one
        given, a tuple for several; one process: the dicts as they are."""
        if self.distributed:
            gathered = self.gather_objects([{k: float(v) for k, v in part.items()} for part in values])
            values = tuple({k: sum(rank[i].get(k, 0.0) for rank in gathered)
                            for k in dict.fromkeys(k for rank in gathered for k in rank[i])}
                           for i in range(len(values)))
        return values[0] if len(values) == 1 else tuple(values)

    def gather_objects(self, value) -> list:
        """[value of rank 0, of rank 1, ...] on every rank."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def rank_rng_state(self) -> dict:
        """{"rank_rng": [every rank's generator states]} for a checkpoint's trainer state ({} for one process):
        the checkpoint's own RNG state is rank 0's."""
        if not self.distributed:
            return {}
        from prefuse.engine.checkpoint.rng import capture_rng_state

        return {"rank_rng": self.gather_objects(capture_rng_state())}

    def restore_rank_rng(self, trainer_state: dict) -> None:
        """This rank's generators from a checkpoint taken on as many ranks (else rank 0's stay, as restored)."""
        states = trainer_state.get("rank_rng")
        if self.distributed and states is not None and len(states) == self.size:
            from prefuse.engine.checkpoint.rng import restore_rng_state

            restore_rng_state(states[self.rank])

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_main(self, action):
        """action() on rank 0 (its result there, None elsewhere), the other ranks waiting until it is done."""
        result = action() if self.main else None
        self.barrier()
        return result

    def main_first(self, action):
        """action() on rank 0, then on the other ranks (which find what rank 0 wrote: a cache file)."""
        result = action() if self.main else None
        self.barrier()
        return result if self.main else action()


def check_supported(cfg, world: World) -> None:
    """One line for a setting that does not run on several ranks yet."""
    if not world.distributed:
        return
    refused = [("online", cfg.online, "--online"), ("sampling_strategy", cfg.sampling_strategy != "random",
                "--sampling_strategy good_priority"), ("advantages", cfg.advantages == "value_head",
                "--advantages value_head"), ("monitor_steps", cfg.monitor_steps > 0, "--monitor_steps"),
               ("loss_type", cfg.needs().slow_adapter, "ofs_dpo's two adapters")]
    for name, on, what in refused:
        if on:
            raise ValueError(f"{name}: {what} runs in one process only for now; start it without torchrun")


def current() -> World:
    """The world of the process group already initialized (by `launch`, or by the caller), else one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return World()
    rank, size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    return World(rank, size, local_rank, device, gather_group=_gather_group())


_GATHER_GROUP = {}


def _gather_group():
    """A group of every rank beside the default one: the objective's all-gathers (forward and backward) never
    interleave with DDP's gradient buckets on the default group."""
    key = id(dist.group.WORLD)
    if key not in _GATHER_GROUP:
        _GATHER_GROUP.clear()
        _GATHER_GROUP[key] = dist.new_group(backend=dist.get_backend())
    return _GATHER_GROUP[key]


@contextlib.contextmanager
def launch():
    """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT):
    its process group is initialized (NCCL on CUDA devices, bound to LOCAL_RANK's; gloo on CPUs) for the duration
    and destroyed after; without WORLD_SIZE > 1, or with a group already initialized, nothing is set up. On ranks
    other than 0 the prints go nowhere (their errors still reach stderr)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if size > 1 and not dist.is_initialized():
        missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
        if missing:
            raise ValueError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start with torchrun "
                             f"--nproc_per_node {size} -m prefuse train ...")
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
        created = True
    world = current()
    try:
        with open(os.devnull, "w") as nowhere, (contextlib.redirect_stdout(nowhere) if not world.main
                                                else contextlib.nullcontext()):
            yield world
    finally:
        if created:
            _GATHER_GROUP.clear()
            dist.destroy_process_group()


# -- the data ------------------------------------------------------------------------------------------------------

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
        raise ValueError("distributed training of batches with images is not supported yet; train them in one "
                         "process")
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


# -- the step under DDP --------------------------------------------------------------------------------------------

class StepModule(torch.nn.Module):
    """The training step as a module, for DDP (and FSDP2) to run their hooks around: its forward is the step's
    call (decoder, reference, fused head, objective) and its parameters are the policy's."""

    def __init__(self, step, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy
        self.__dict__["step"] = step  # not a submodule: the step holds the same policy

    def forward(self, batch: Batch, reference=None, **inputs):
        return self.step(batch, reference, **inputs)


class DataParallelStep:
    """A step whose calls go through a DDP-wrapped StepModule; everything else is the step's."""

    def __init__(self, step, module: torch.nn.Module):
        self.__dict__.update(inner=step, module=module)

    def __call__(self, batch: Batch, reference=None, **inputs):
        return self.module(batch, reference, **inputs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class RankLog(MetricsLog):
    """The metrics window of a rank other than 0: kept (the same on every rank) but never written."""

    def __init__(self, output_dir, *, window: dict | None = None, **_):
        self.path, self.writer = None, None
        self.window = window or self._empty()

    def write(self, record: dict) -> None:
        pass
