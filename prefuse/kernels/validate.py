"""Input checks for the fused head. Every failure is a ValueError that names the argument and the fix."""
from __future__ import annotations

import math
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
BACKENDS = ("auto", "torch", "triton")


def check_head_inputs(hidden, weight, labels, bias, *, ignore_index: int, check_finite: bool = False) -> None:
    """hidden [..., H], weight [V, H], labels [...] (or None), bias [V] | None."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 1:
        raise ValueError("hidden: expected a tensor of shape [..., H]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape [V, H] (the lm_head weight), got {got}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden: last dimension {hidden.shape[-1]} does not match weight's hidden size {weight.shape[1]} "
            f"(weight is [V, H] = {tuple(weight.shape)}; pass lm_head.weight, not its transpose)")
    if hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden: dtype {hidden.dtype} is not a floating type ({', '.join(map(str, FLOAT_DTYPES))})")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight: dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one to the other")
    if weight.device != hidden.device:
        raise ValueError(f"weight: on {weight.device} but hidden is on {hidden.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: expected shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias: dtype {bias.dtype} differs from weight's {weight.dtype}")
    if labels is not None:
        if labels.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels: shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"labels: expected an integer tensor of token ids, got {labels.dtype}")
        if labels.device != hidden.device:
            raise ValueError(f"labels: on {labels.device} but hidden is on {hidden.device}")
        vocab = weight.shape[0]
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if bool(bad.any()):
            first = labels[bad].flatten()[0].item()
            raise ValueError(
                f"labels: value {first} is outside [0, {vocab}) and is not ignore_index={ignore_index}; "
                f"mark prompt and padding tokens with ignore_index")
    if check_finite and not bool(torch.isfinite(hidden).all()):
        raise ValueError("hidden: contains NaN or Inf (check_finite=True); the model's forward diverged upstream")


def check_transform(temperature: float | torch.Tensor, softcap: float | None,
                    shape: tuple[int, ...] | torch.Size | None = None) -> None:
    """temperature: a finite number > 0, or (where the entry point passes the leading `shape` of its labels) a
    tensor of such values, one per row: its shape a prefix of `shape` (trailing dimensions of size 1 allowed),
    e.g. [S] per sequence or [S, T] per token for labels [S, T]."""
    if isinstance(temperature, torch.Tensor):
        check_temperature_tensor(temperature, shape)
    elif isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
                                               and temperature > 0):
        raise ValueError(f"temperature: must be a finite number > 0, got {temperature!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap: must be None or a finite number > 0, got {softcap!r}")


def check_temperature_tensor(temperature: torch.Tensor, shape) -> None:
    if shape is None:
        raise ValueError("temperature: this entry point takes one number; pass a float (per-row temperatures go "
                         "through linear_logprobs, linear_cross_entropy, linear_token_stats or the grouped head)")
    shape = tuple(shape)
    got = tuple(temperature.shape)
    if not temperature.dtype.is_floating_point:
        raise ValueError(f"temperature: expected a floating tensor, got {temperature.dtype}")
    if len(got) > len(shape) or any(g not in (1, s) for g, s in zip(got, shape)):
        raise ValueError(f"temperature: shape {got} does not fit labels' {shape}; pass one value per sequence "
                         f"{shape[:1]} or per token {shape} (a leading part of labels' shape)")
    if temperature.requires_grad and torch.is_grad_enabled():
        raise ValueError("temperature: the head takes no gradient with respect to the temperature; pass "
                         "temperature.detach()")
    if temperature.numel() and not bool((torch.isfinite(temperature) & (temperature > 0)).all()):
        raise ValueError("temperature: every value must be a finite number > 0")


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" is triton on CUDA tensors (when triton imports) and torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of {BACKENDS}")
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend: 'triton' requested but triton is not installed; use backend='torch'")
        if device.type != "cuda" and not interpreting:
            raise ValueError(
                f"backend: 'triton' needs CUDA tensors (got {device}); on the CPU set TRITON_INTERPRET=1 before "
                f"importing prefuse, or use backend='torch'")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
