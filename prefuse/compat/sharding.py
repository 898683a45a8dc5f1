"""The lm_head as the fused head must see it under sharded training: whole.

Under FSDP2 a parameter outside a running forward is a DTensor shard ([V / world, H] of the lm_head weight) unless its
FSDP unit holds it unsharded: the lm_head's unit resharded after its forward, or a unit whose forward never runs (the
fused head reads the weight without calling the lm_head module). `full_head` gathers such a shard with
`DTensor.full_tensor()`, an all-gather whose backward reduce-scatters (averages) the processes' gradients into the
shard.
"""
from __future__ import annotations

from dataclasses import replace

from torch.distributed.tensor import DTensor, Partial

from prefuse.heads import Head

__all__ = ["check_not_zero3", "full_head", "whole"]


def whole(tensor):
    """A DTensor gathered whole, any other tensor (or None) as it is. Each process's gradient of the gathered tensor
    is a partial one (of its own batch): the backward averages them over the mesh into the shard (a reduce-scatter,
    FSDP2's own data-parallel mean), where a plain full_tensor() would keep each process's own rows of its own
    gradient."""
    if not isinstance(tensor, DTensor):
        return tensor
    return tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)


def full_head(head: Head) -> Head:
    """`head` with its weight, bias and LoRA factors gathered whole where they are DTensor shards (FSDP2);
    differentiable. Every process of the mesh must call it (an all-gather)."""
    lora = head.lora
    if lora is not None:
        lora = replace(lora, a=whole(lora.a), b=whole(lora.b))
    return replace(head, weight=whole(head.weight), bias=whole(head.bias), lora=lora)


def check_not_zero3(trainer, name: str) -> None:
    """Refuse DeepSpeed ZeRO-3 in one line: it partitions the lm_head weight to numel 0 outside the lm_head module's
    forward, which the fused head never calls, and the head's backward recomputes its chunks from that weight."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError(f"DeepSpeed ZeRO-3 (zero_stage=3): not supported by {name}, whose fused head reads the "
                         f"lm_head weight that ZeRO-3 partitions away; use FSDP2 (fsdp_version: 2) or ZeRO-1/2")
