"""The objective section of `prefuse train`'s settings: which objectives (prefuse.algorithms' registry), their weights
and hyper-parameters, and the reference's cached log-probs (engine/core/reference_cache.py)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from prefuse.algorithms import get_objective
from prefuse.algorithms.hparams import check_hparams
from prefuse.algorithms.registry import OBJECTIVES
from prefuse.engine.checks import check_field, setting


def objective_hparam_names() -> list[str]:
    """Every hyper-parameter some registered objective accepts (the CLI offers each as a flag), less those that are
    settings of their own here (use_weighting)."""
    own = {f.name for f in fields(ObjectiveSettings)}
    return sorted(set().union(*(spec.hparams for spec in OBJECTIVES.values())) - {"loss_type"} - own)


@dataclass
class ObjectiveSettings:
    loss_type: list[str] = setting(["sigmoid"], "objective name(s); several are summed with --loss_weights (see "
                                                "prefuse.list_objectives())")
    loss_weights: list[float] | None = setting(None, "one weight per --loss_type objective (default: 1 each)")
    beta: float | None = setting(None, "the objective's KL strength (default: the objective's own, from its paper or "
                                       "TRL 1.16: 0.1 for the DPO family, grpo 0.0, rloo 0.05, selm 0.01; `prefuse "
                                       "objectives` lists them)")
    objective_args: dict[str, Any] = setting({}, "objective hyper-parameters as key=value (each also has its own "
                                                 "flag below)")
    precompute_ref_log_probs: bool = setting(False, "compute the reference's sums once and cache them in "
                                                    "--output_dir")
    use_weighting: bool = setting(False, "WPO (Zhou et al. 2024, TRL's use_weighting): each pair's loss times "
                                         "w(chosen) w(rejected), w = exp(mean over the response of log p(y_t) - log "
                                         "sum_v p(v)^2) under the policy, without gradient; DPO-family objectives")

    @property
    def objective_hparams(self) -> dict[str, Any]:
        """The hyper-parameters PreferenceLoss takes: objective_args, and use_weighting when set."""
        return {**self.objective_args, **({"use_weighting": True} if self.use_weighting else {})}

    @property
    def objective(self) -> str | list[str]:
        """The objective as PreferenceLoss and objective_loss take it: a name, or a list of names."""
        return self.loss_type[0] if len(self.loss_type) == 1 else list(self.loss_type)

    def check_names(self) -> None:
        """loss_type: a non-empty list of registered objectives (before their defaults are read)."""
        check_field(isinstance(self.loss_type, list) and len(self.loss_type) >= 1, "loss_type",
                    "give at least one objective name")
        for name in self.loss_type:
            try:
                get_objective(name)
            except ValueError as error:
                raise ValueError(f"loss_type: {error}") from None

    def check(self) -> None:
        """One-line ValueErrors naming the field (beta filled by the objective's default first)."""
        self.check_names()
        specs = [get_objective(n) for n in self.loss_type]
        check_field(self.loss_weights is None or len(self.loss_weights) == len(specs), "loss_weights",
                    f"{len(self.loss_weights or [])} weight(s) for {len(specs)} objective(s) {self.loss_type}")
        accepted = set().union(*(spec.hparams for spec in specs))
        for name in ("mixed_p", "avg_gamma"):  # Mixed-DPO's P(offline pair), Avg-DPO's weight of the external y-
            value = self.objective_args.get(name, 0.5)
            check_field(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1, name,
                        f"must be a number in [0, 1], got {value!r}")
        unknown = sorted(set(self.objective_args) - accepted)
        check_field(not unknown, "objective_args", f"{unknown} not accepted by {self.loss_type}; they accept "
                                                   f"{sorted(accepted) or 'none'}")
        if self.use_weighting or self.objective_args.get("use_weighting"):
            others = [spec.name for spec in specs if "use_weighting" not in spec.hparams]
            check_field(not others, "use_weighting", f"WPO weighting applies to the DPO family; {others} do not "
                                                     f"take it")
        check_field(self.beta >= 0, "beta", f"must be non-negative, got {self.beta}")
        weights = self.loss_weights or [1.0] * len(specs)
        check_field(all(w >= 0 for w in weights) and any(w > 0 for w in weights), "loss_weights",
                    f"{weights} leaves nothing to learn or unlearns an objective; give weights >= 0, at least one > 0")
        for spec in specs:  # values that divide by zero or make the objective constant (algorithms/hparams.py)
            check_hparams(spec.name, self.beta, {k: v for k, v in self.objective_args.items() if k in spec.hparams})
