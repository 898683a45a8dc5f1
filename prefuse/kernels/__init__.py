"""prefuse.kernels: the fused lm_head -> log-prob layer. Tensors in, tensors out; no models, data or objectives."""
from prefuse.kernels.fused_head import FusedHeadInForward, FusedLogprobs, FusedLogprobsFrozenWeight, HeadConfig
from prefuse.kernels.grouped import RowGroups, group_rows, grouped_logprobs, grouped_logprobs_shared
from prefuse.kernels.linear_head import linear_cross_entropy, linear_logprobs
from prefuse.kernels.plan import Plan, make_plan
from prefuse.kernels.stats import TokenStats, linear_token_stats

__all__ = [
    "linear_logprobs", "linear_cross_entropy", "linear_token_stats", "TokenStats",
    "RowGroups", "group_rows", "grouped_logprobs", "grouped_logprobs_shared", "FusedLogprobs", "FusedHeadInForward",
    "FusedLogprobsFrozenWeight", "HeadConfig", "Plan",
    "make_plan",
]
