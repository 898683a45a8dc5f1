"""Benchmark paths: each builds a forward+backward step of a linear cross-entropy head at a shape.

A path is a function `make(hidden [N, H], weight [V, H], labels [N]) -> step()`; `step()` runs forward and
backward and returns the loss. Peers are included only when their package imports (`available()`).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import prefuse


@dataclass(frozen=True)
class Path:
    name: str
    make: Callable
    devices: tuple[str, ...] = ("cpu", "cuda")
    requires: str | None = None  # module that must import
    warmup: int = 1  # compiled peers need their first call to compile

    def available(self, device: str) -> bool:
        if device not in self.devices:
            return False
        return self.requires is None or importlib.util.find_spec(self.requires) is not None


def _step(loss_fn, hidden, weight):
    def step():
        hidden.grad = weight.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach()
    return step


def prefuse_path(backend: str, mode: str):
    def make(hidden, weight, labels):
        return _step(lambda: prefuse.linear_cross_entropy(hidden, weight, labels, backend=backend, mode=mode),
                     hidden, weight)
    return make


def materialized(hidden, weight, labels):
    return _step(lambda: F.cross_entropy((hidden @ weight.t()).float(), labels), hidden, weight)


def torch_linear_cross_entropy(hidden, weight, labels):
    options = torch.nn.LinearCrossEntropyOptions()
    return _step(lambda: F.linear_cross_entropy(hidden, weight, labels, options=options), hidden, weight)


def cut_cross_entropy(impl: str):
    def make(hidden, weight, labels):
        from cut_cross_entropy import linear_cross_entropy

        return _step(lambda: linear_cross_entropy(hidden, weight, labels, impl=impl), hidden, weight)
    return make


PATHS: dict[str, Path] = {p.name: p for p in [
    Path("prefuse_torch", prefuse_path("torch", "auto")),
    Path("prefuse_torch_recompute", prefuse_path("torch", "recompute")),
    Path("prefuse_triton", prefuse_path("triton", "auto"), devices=("cuda",), requires="triton"),
    Path("materialized", materialized),
    Path("torch_linear_cross_entropy", torch_linear_cross_entropy),
    Path("cce_torch_compile", cut_cross_entropy("torch_compile"), requires="cut_cross_entropy", warmup=2),
    Path("cce_triton", cut_cross_entropy("cce"), devices=("cuda",), requires="cut_cross_entropy"),
    Path("liger_fused_linear_cross_entropy", None, devices=("cuda",), requires="liger_kernel"),
]}


def _liger(hidden, weight, labels):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return _step(lambda: loss(weight, hidden, labels), hidden, weight)


PATHS["liger_fused_linear_cross_entropy"] = Path("liger_fused_linear_cross_entropy", _liger, devices=("cuda",),
                                                 requires="liger_kernel")


def make_inputs(n: int, h: int, v: int, dtype: torch.dtype, device: str, ignore_frac: float, seed: int = 0):
    """hidden [N, H] and weight [V, H] requiring grad, labels [N] with `ignore_frac` of them -100."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype=dtype, device=device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h ** 0.5).to(dtype=dtype, device=device).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hidden, weight, labels.to(device)
