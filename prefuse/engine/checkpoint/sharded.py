"""The weights and optimizer state of an FSDP2 run as a distributed checkpoint (`torch.distributed.checkpoint`).

    output_dir/checkpoint-{step}/
        dcp/                    every rank's shards of the trainable parameters and their optimizer states
                                (.metadata and __<rank>_<n>.distcp files: DCP's own layout, keyed by parameter name)
        trainer_state.json, scheduler.json, rng.json, checkpoint.json    as in any checkpoint (written by rank 0)

Every rank writes its shards with `dcp.save` into a staging directory beside the checkpoints; rank 0 then moves it
into the checkpoint's temporary directory, writes the other files and renames the whole into place, as for every
checkpoint (nothing is ever visible as checkpoint-{step} before it is complete). The states are keyed by parameter
names (`get_state_dict`), not by ranks, so a checkpoint loads into any number of ranks: FSDP2 on another number
of ranks, DDP, or a single process (`dcp.load` without a process group), and `prefuse export` reads it.
Only the trainable parameters are stored (LoRA: the adapters); the others come from the base model, as for a LoRA
run's adapter checkpoint. The directory must be on a filesystem every rank sees (one machine, or a shared one).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from . import files

DCP_WEIGHTS = "dcp"  # the manifest's kind of weights
DCP_DIR = "dcp"


def _options(setting: bool = False):
    """The trainable parameters only; setting them leaves the frozen ones as they are (strict=False: dcp.load
    has already checked that every trainable one was in the checkpoint)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=not setting)


def is_sharded(model: torch.nn.Module) -> bool:
    """True when the model's parameters are FSDP2's DTensor shards."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def stage_distributed_weights(output_dir, step: int, *, model, optimizer) -> Path:
    """Every rank's shards of the trainable weights and their optimizer states, written with dcp.save into a
    staging directory (named by rank 0, beside the checkpoints); collective: every rank calls it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    output_dir = Path(output_dir)
    name = [None]
    if dist.get_rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = files.temp_dir_for(output_dir, f"dcp{step}")  # .tmp-checkpoint-dcp<step>-<pid of rank 0>
        shutil.rmtree(staging, ignore_errors=True)
        name = [str(staging)]
    dist.broadcast_object_list(name, src=0)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=name[0])
    return Path(name[0])


def weights_from_staging(staging: Path):
    """write_weights for save_checkpoint: moves the staged DCP directory into the checkpoint's temporary one."""

    def write(temp_dir: Path) -> tuple[str, list[str]]:
        os.rename(staging, temp_dir / DCP_DIR)
        written = sorted(str(Path(root, n).relative_to(temp_dir)) for root, _, names in os.walk(temp_dir / DCP_DIR)
                         for n in names)
        return DCP_WEIGHTS, written

    return write


def read_distributed_weights(path: Path, model, optimizer=None):
    """Load the DCP weights (and the optimizer's states) of checkpoint `path` into the model's current layout
    (FSDP2 shards on any number of ranks, or whole tensors); return the function that sets them in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    if optimizer is None:
        model_state = get_model_state_dict(model, options=_options())
        state = {"model": model_state}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))  # fills `state` in place; every key must be there
    except Exception as error:  # DCP's CheckpointException names the missing keys
        raise ValueError(f"checkpoint {path}: its distributed weights do not match the model: "
                         f"{' '.join(str(error).split())[:400]}") from None

    def copy_in():
        if optimizer is None:
            set_model_state_dict(model, state["model"], options=_options(setting=True))
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                           options=_options(setting=True))

    return copy_in
