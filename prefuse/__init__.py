"""prefuse: fused-kernel preference alignment. The [tokens x vocab] logits are never materialized."""
from prefuse.algorithms import get_objective, list_objectives, objective_loss
from prefuse.kernels import TokenStats, linear_cross_entropy, linear_logprobs, linear_token_stats

__version__ = "0.1.0"
__all__ = [
    "linear_logprobs", "linear_cross_entropy", "linear_token_stats", "TokenStats",
    "objective_loss", "list_objectives", "get_objective", "__version__",
]
