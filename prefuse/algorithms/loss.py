"""One entry point for every objective: validate the arguments, run the objective(s), reduce to a scalar.

    loss, metrics = objective_loss("sigmoid", policy_chosen_logps=..., policy_rejected_logps=...,
                                   ref_chosen_logps=..., ref_rejected_logps=..., beta=0.1)
    loss, metrics = objective_loss(["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], ...)  # MPO

Keyword arguments other than the named ones are sorted by the objectives' specs into extra inputs (tensors such as
`labels`, `policy_logps`) and hyper-parameters; anything no objective accepts is an error.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .registry import ObjectiveSpec, get_objective

__all__ = ["objective_loss", "split_arguments", "reduce_metrics"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _upcast(value: Any) -> Any:
    """bf16/fp16 statistics are computed in float32: the objectives promise float32/float64 in and out."""
    if isinstance(value, torch.Tensor) and value.dtype in _LOW_PRECISION:
        return value.float()
    return value


def split_arguments(specs: Sequence[ObjectiveSpec], arguments: dict[str, Any]) -> tuple[dict, dict]:
    """Sort keyword arguments into (inputs, hparams) for `specs`; a ValueError lists what is accepted."""
    accepted_inputs = set().union(*(spec.inputs for spec in specs))
    accepted_hparams = set().union(*(spec.hparams for spec in specs))
    inputs, hparams, unknown = {}, {}, []
    for key, value in arguments.items():
        if key in accepted_hparams:
            hparams[key] = value
        elif key in accepted_inputs:
            inputs[key] = value
        else:
            unknown.append(key)
    if unknown:
        accepted = "\n  ".join(spec.accepts() for spec in specs)
        raise ValueError(f"unknown argument(s) {', '.join(sorted(unknown))}. Accepted:\n  {accepted}")
    return inputs, hparams


def _check_batch_sizes(spec: ObjectiveSpec, inputs: dict[str, Any]) -> None:
    """The 1-D statistics one objective reads describe the same examples, so they share one length."""
    sizes = {
        name: tuple(value.shape)
        for name, value in inputs.items()
        if name in spec.inputs and isinstance(value, torch.Tensor) and value.dim() == 1
    }
    if len(set(sizes.values())) > 1:
        raise ValueError(f"objective {spec.name!r}: inputs of different batch sizes: {sizes}")


def reduce_metrics(metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Per-example metrics -> 0-d float tensors (batch means), detached."""
    reduced = {}
    for key, value in metrics.items():
        tensor = torch.as_tensor(value).detach()
        reduced[key] = tensor.float().mean() if tensor.numel() else torch.tensor(0.0)
    return reduced


def objective_loss(
    name: str | Sequence[str],
    *,
    policy_chosen_logps: torch.Tensor | None = None,
    policy_rejected_logps: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The batch loss of objective `name` (or the weighted sum of a list of objectives) and its metrics.

    policy_*_logps, ref_*_logps [B]: summed response-token log-probs; *_lengths [B]: response token counts.
    Returns (loss, a 0-d tensor: sum_k loss_weights[k] * mean(losses_k); metrics: name -> 0-d tensor, batch means).
    With several objectives each also reports `loss/<name>`; shared metric names keep the first objective's value.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("objective_loss needs at least one objective name")
    specs = [get_objective(n) for n in names]
    weights = [1.0] * len(specs) if loss_weights is None else list(loss_weights)
    if len(weights) != len(specs):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(specs)} objectives {names}")

    named_inputs = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
    }
    arguments = {k: v for k, v in named_inputs.items() if v is not None}
    arguments.update(kwargs)
    inputs, hparams = split_arguments(specs, arguments)
    inputs = {k: _upcast(v) for k, v in inputs.items()}

    total = None
    metrics: dict[str, Any] = {}
    for spec, weight in zip(specs, weights):
        missing = sorted(spec.requires - inputs.keys())
        if missing:
            raise ValueError(f"objective {spec.name!r} needs the input(s) {', '.join(missing)}; {spec.accepts()}")
        _check_batch_sizes(spec, inputs)
        own_inputs = {k: v for k, v in inputs.items() if k in spec.inputs}
        own_hparams = {k: v for k, v in hparams.items() if k in spec.hparams}
        losses, own_metrics = spec.fn(beta=beta, **own_inputs, **own_hparams)
        term = losses.mean() * weight
        total = term if total is None else total + term
        for key, value in own_metrics.items():
            metrics.setdefault(key, value)
        if len(specs) > 1:
            metrics[f"loss/{spec.name}"] = losses.detach().mean()
    return total, reduce_metrics(metrics)
