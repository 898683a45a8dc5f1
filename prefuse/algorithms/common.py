"""Small numeric helpers shared by the objective families.

Everything here is a differentiable torch op on sequence-level statistics ([B] tensors) unless the docstring says
otherwise. The helpers exist so that every family guards against the same overflows in the same way.
"""

from __future__ import annotations

import torch

# exp() of anything above this overflows float16 and is far past any meaningful weight in float32 (e^80 ~ 5e34):
# every exponent an objective takes is clamped here so an extreme log-ratio gives a large finite value, not inf/NaN.
EXP_CLAMP = 80.0


def safe_exp(x: torch.Tensor) -> torch.Tensor:
    """exp(min(x, EXP_CLAMP)): finite for any finite x."""
    return torch.exp(torch.clamp(x, max=EXP_CLAMP))


def token_counts(lengths: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Response token counts as floats of `like`'s dtype, at least 1 so an empty response averages to 0, not NaN.

    lengths [B] (int or float) -> [B]
    """
    return torch.as_tensor(lengths, device=like.device).to(like.dtype).clamp(min=1.0)


def per_token_mean(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sum of log-probs over a response divided by its token count (an empty response gives 0).

    logps [B], lengths [B] -> [B]
    """
    return logps / token_counts(lengths, logps)


def batch_token_mean_nll(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood averaged over every token of the batch (cross-entropy with mean reduction).

    logps [B] (per-sequence sums), lengths [B] -> 0-d. A batch without tokens gives 0.
    """
    total_tokens = torch.as_tensor(lengths, device=logps.device).to(logps.dtype).sum().clamp(min=1.0)
    return -logps.sum() / total_tokens


def require_inputs(objective: str, **inputs: torch.Tensor | None) -> None:
    """Raise a ValueError naming every input in `inputs` that is None."""
    missing = sorted(name for name, value in inputs.items() if value is None)
    if missing:
        raise ValueError(f"objective {objective!r} needs the input(s) {', '.join(missing)}")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError when an option has a value outside its accepted set."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not accepted; choose one of {', '.join(map(repr, choices))}")


def reward_metrics(
    beta: float,
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The pairwise metrics under their TRL 1.16 names, per example ([B], detached; the API averages them).

    rewards/* are beta * log-ratio; accuracies count strict wins of chosen over rejected.
    """
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


def verbose_token_mask(completion_mask: torch.Tensor, shared_lengths: torch.Tensor) -> torch.Tensor:
    """Mask of the response tokens past the first `shared_lengths` ones (LD-DPO's "verbose" part).

    For a pair, `shared_lengths = minimum(chosen_lengths, rejected_lengths)`; the callers reduce
    `(per_token_logps * mask).sum(-1)` to get the `*_verbose_logps` inputs of the DPO family.
    completion_mask [B, T] (1 on response tokens, in order), shared_lengths [B] -> bool [B, T]
    """
    position = completion_mask.long().cumsum(dim=-1)
    return completion_mask.bool() & (position > shared_lengths.long().unsqueeze(-1))
