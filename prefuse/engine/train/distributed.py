"""Multi-process training on PyTorch's own stack: the torchrun world, DDP and FSDP2 around the step, the sharded
data order, the reductions, rank-0 I/O.

    torchrun --nproc_per_node K -m prefuse train ... [--fsdp]   # K ranks (WORLD_SIZE, RANK, LOCAL_RANK)

    with launch() as world:                    # the process group torchrun describes (gloo on CPUs, NCCL on GPUs)
        source = ShardedSource(global_source, world)   # each rank's share of every global batch (online: shard_online)
        step = world.wrap(step, models, fsdp=...)      # the step's forward under DDP, or FSDP2 (fully_shard_step)
        with world.micro_batch(last):          # gradients synchronized on the last micro-batch only
            ...
        world.total(n), world.sum_metrics(m)   # step-level sums over the ranks
        world.save_checkpoint(...)             # rank 0 writes (FSDP2: every rank its DCP shards first)

What runs where:
- Data: every rank walks the same seeded order of global batches (K x per_device_train_batch_size examples, the
  batches one process with that batch size would see) and takes its contiguous share of each (`shard_batch`;
  uneven last batches split as evenly as possible, none left empty). The sequences keep the global batch's
  padding, and a role that pairs examples inside a batch (KTO's `kl` completions) is formed over the global batch.
  Online, each rank samples its own share of every global batch of prompts, from a seed of its own.
- Normalization: the loop weighs each micro-batch's mean loss by its examples over the global step's examples
  (`total`), times K, because DDP (and FSDP2's reduce-scatter) average gradients over the ranks: K ranks then
  apply exactly the update of one process on the same global batch.
- Objectives coupled across the batch (`spec.separable` False: KTO's KL reference point, `aot`'s sorting, `sft`'s
  token mean, GRPO's group statistics, anything normalized over the batch): `PreferenceLoss.batch_group`
  all-gathers every per-example input of the objective with autograd (`batch_gather.gather_examples`), so
  the objective sees the global micro-batch; each rank's loss is then that global mean, whose gradient the
  gather's backward sums back to the rank's own rows from every rank (K times its share, which the gradient
  average divides out again).
- The model: prefuse never calls the model's forward (the decoder's last hidden states go through the fused head),
  and DDP reduces gradients only for a forward run through it; so DDP wraps the step itself (`StepModule`, whose
  only submodule is the policy): decoder, reference and the fused head on the lm_head all run inside DDP's forward
  and every trainable parameter's gradient (the lm_head's, tied or not) is all-reduced once by DDP's own hooks.
  FSDP2 shards the decoder layers and takes the same StepModule as its root (`fully_shard_step`), so the fused head
  runs inside the root's forward on the whole, unsharded lm_head weight.
- I/O: only rank 0 writes metrics.jsonl, TensorBoard, checkpoints and prints; the others wait at a barrier after
  a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from prefuse.engine.checkpoint import save_checkpoint
from prefuse.engine.checkpoint.rng import capture_rng_state, restore_rng_state
from prefuse.engine.checkpoint.sharded import stage_distributed_weights, weights_from_staging
from prefuse.engine.core.metrics import MetricsLog
from prefuse.engine.core.sources import Batch
from prefuse.heads import causal_lm_of

__all__ = ["World", "launch", "current", "check_supported", "StepModule", "fully_shard_step", "RankLog"]


@dataclass
class World:
    """The ranks of a run. A single process is World() (rank 0 of 1): every method is then a no-op."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    gather_group: object = None  # the group over which a batch's per-example statistics are all-gathered
    module: torch.nn.Module | None = None  # the DDP-wrapped (or FSDP2-sharded) step, once wrap() has run
    sharded: bool = False  # FSDP2

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # -- the model ----------------------------------------------------------------------------------------------

    def wrap(self, step, models, *, fsdp: str = "", bf16: bool = False):
        """The step whose calls run through the DDP-wrapped (or, with fsdp, FSDP2-sharded) StepModule; the step
        itself for one process."""
        if not self.distributed:
            return step
        if hasattr(step, "loss_fn"):  # PreferenceLoss's batch-level statistics over the ranks (an SFT step has none)
            step.loss_fn.batch_group = self.gather_group
        if fsdp:
            self.module, self.sharded = fully_shard_step(step, models, self, bf16=bf16), True
        else:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters=False: every trainable parameter gets its gradient in every step (the fused
            # head gives the lm_head's); forward_sync_buffers=False: the buffers (rotary frequencies) never change
            self.module = DistributedDataParallel(StepModule(step, models.policy), forward_sync_buffers=False,
                                                  device_ids=None)
        return DataParallelStep(step, self.module)

    def micro_batch(self, last: bool):
        """The context of one micro-batch's forward and backward: gradients are synchronized only on the last one
        of an optimizer step (DDP's no_sync() on the others; FSDP2: set_requires_gradient_sync)."""
        if self.module is None:
            return contextlib.nullcontext()
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.module.no_sync()

    def generation(self, sample):
        """sample(): rollouts from the policy (and the reference), run where the models are whole. Under FSDP2,
        inside the root's forward: its pre-forward all-gathers the root's weights (the lm_heads, the final norms,
        a tied embedding), every decoder layer's own hooks all-gather it for each of its forwards, and the root's
        weights are resharded afterwards; the rollouts must then be `synced_gpus` (every rank runs as many
        forwards). DDP and one process: sample() as it is."""
        if not self.sharded:
            return sample()
        try:
            return self.module(run=sample)
        finally:
            self.module.reshard()

    def save_checkpoint(self, output_dir, step: int, *, model, optimizer, **options):
        """checkpoint.save_checkpoint on rank 0, the others waiting until it is in place (their weights and
        optimizer states are rank 0's); under FSDP2, every rank first writes its shards (DCP)."""

        if not self.sharded:
            return self.on_main(lambda: save_checkpoint(output_dir, step, model=model, optimizer=optimizer,
                                                        **options))
        staging = stage_distributed_weights(output_dir, step, model=model, optimizer=optimizer)
        return self.on_main(lambda: save_checkpoint(output_dir, step, model=model, optimizer=None,
                                                    write_weights=weights_from_staging(staging), **options))

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

        return {"rank_rng": self.gather_objects(capture_rng_state())}

    def restore_rank_rng(self, trainer_state: dict) -> None:
        """This rank's generators from a checkpoint taken on as many ranks (else rank 0's stay, as restored)."""
        states = trainer_state.get("rank_rng")
        if self.distributed and states is not None and len(states) == self.size:

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
    """One line for a setting that does not run on several ranks yet (or, --fsdp, on one)."""
    if not world.distributed:
        if cfg.fsdp:
            raise ValueError("fsdp: shards the model over the ranks of torchrun: start with torchrun "
                             "--nproc_per_node K -m prefuse train ... (one process trains without --fsdp)")
        return
    refused = [("avg_rejected", cfg.online and bool(cfg.fsdp) and cfg.avg_rejected == "bdhs" and "avg_dpo" in cfg.loss_type,
                "--avg_rejected bdhs with --fsdp (each rank's retries would run different numbers of forwards)"),
               ("pair_samples", cfg.online and bool(cfg.fsdp) and (cfg.pair_samples > 2 or "selm" in cfg.loss_type),
                "best-of-n and SELM's ranking with --fsdp (a rank whose prompts all tie samples again: the ranks "
                "would run different numbers of forwards)"),
               ("iterations", cfg.online and cfg.iterations > 1, "--iterations"),
               ("use_vllm", cfg.online and cfg.use_vllm, "--use_vllm"),
               ("sampling_strategy", cfg.sampling_strategy != "random", "--sampling_strategy good_priority"),
               ("advantages", cfg.advantages == "value_head", "--advantages value_head"),
               ("monitor_steps", cfg.monitor_steps > 0, "--monitor_steps"),
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
        if created:
            dist.barrier()  # every rank done before the group goes (not after an error: the others may never come)
    finally:
        if created:
            _GATHER_GROUP.clear()
            dist.destroy_process_group()


# -- the step under DDP --------------------------------------------------------------------------------------------

class StepModule(torch.nn.Module):
    """The training step as a module, for DDP and FSDP2 to run their hooks around: its forward is the step's
    call (decoder, reference, fused head, objective) and its parameters are the policy's (and, to be sharded
    under FSDP2, the frozen reference's)."""

    def __init__(self, step, policy: torch.nn.Module, reference: torch.nn.Module | None = None):
        super().__init__()
        self.module, self.reference = policy, reference  # `module`: heads.head_of(ddp) finds the policy's head
        self.__dict__["step"] = step  # not a submodule: the step holds the same policy

    def forward(self, batch: Batch | None = None, reference=None, run=None, **inputs):
        """The step on a batch; or run(), for work that needs the whole weights outside a step (World.generation)."""
        if run is not None:
            return run()
        return self.step(batch, reference, **inputs)


def fully_shard_step(step, models, world: World, *, bf16: bool = False) -> torch.nn.Module:
    """FSDP2 over the ranks: `fully_shard` on every decoder layer (policy and reference), on the input embedding
    when it is not tied to the lm_head, and at the root, which is the StepModule. The root's unit holds what
    is left: the lm_head (tied or not) and the final norm. The root's forward is the whole step, so FSDP2's
    own pre-forward all-gather gives the fused head the whole lm_head weight (and the reference's), the
    gradient the head forms lands on that unsharded parameter and FSDP2's post-backward reduce-scatters it
    once, with the embedding's contribution when they are tied. Peak: the root's unsharded weights (one
    lm_head per model) plus the layer being computed and the head's chunk buffers. bf16: MixedPrecisionPolicy
    (bf16 parameters in compute, float32 gradient reduction)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


    options = dict(mesh=init_device_mesh(world.device.type, (world.size,)))
    if bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model in (models.policy, models.reference):
        if model is None:
            continue
        causal_lm = causal_lm_of(model)
        layers = getattr(causal_lm.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"fsdp: {type(causal_lm).__name__} has no decoder.layers to shard one by one")
        for layer in layers:
            fully_shard(layer, **options)
        embedding = causal_lm.get_input_embeddings()
        if embedding.weight is not causal_lm.get_output_embeddings().weight:
            fully_shard(embedding, **options)
    return fully_shard(StepModule(step, models.policy, models.reference), **options)


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
