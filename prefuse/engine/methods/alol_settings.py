"""A-LoL's section of `prefuse train`'s settings: the advantages, the value head that gives V_ref(x), and the order
of examples (engine/methods/alol_advantages.py, engine/methods/alol_value_head.py)."""
from __future__ import annotations

from dataclasses import dataclass

from prefuse.engine.checks import check_field, setting

ADVANTAGE_MODES = ("auto", "column", "mean", "value_head")
SAMPLING_STRATEGIES = ("random", "good_priority")
VALUE_TARGETS = ("data", "reference_samples")


@dataclass
class ALoLSettings:
    advantages: str = setting("auto", "A-LoL's advantages: auto (the advantage column, else reward minus the mean "
                                      "reward), column, mean, or value_head (reward minus V_ref(x))")
    value_head_epochs: int = setting(10, "--advantages value_head: epochs of its fit")
    value_head_lr: float = setting(1e-5, "--advantages value_head: its AdamW learning rate")
    value_fraction: float = setting(0.1, "--advantages value_head: the fraction of the training prompts held out to "
                                         "fit V (training does not see them)")
    value_targets: str = setting("data", "--advantages value_head: V's targets, the data's rewards of the value "
                                         "split's responses (data), or the judge's rewards of --value_samples samples "
                                         "of the reference per value prompt (reference_samples)")
    value_samples: int = setting(1, "--value_targets reference_samples: samples of the reference per value prompt "
                                    "(--max_new_tokens, --temperature, --top_p)")
    sampling_strategy: str = setting("random", "random (shuffled epochs), or good_priority (draw examples with "
                                               "probability proportional to their positive advantage)")

    def check(self) -> None:
        """One-line ValueErrors naming the field."""
        check_field(self.advantages in ADVANTAGE_MODES, "advantages",
                    f"{self.advantages!r} is not one of {', '.join(ADVANTAGE_MODES)}")
        check_field(self.sampling_strategy in SAMPLING_STRATEGIES, "sampling_strategy",
                    f"{self.sampling_strategy!r} is not one of {', '.join(SAMPLING_STRATEGIES)}")
        check_field(self.value_head_epochs >= 1, "value_head_epochs",
                    f"must be at least 1, got {self.value_head_epochs}")
        check_field(self.value_head_lr > 0, "value_head_lr", f"must be positive, got {self.value_head_lr}")
        check_field(0 < self.value_fraction < 1, "value_fraction", f"must be in (0, 1), got {self.value_fraction}")
        check_field(self.value_targets in VALUE_TARGETS, "value_targets",
                    f"{self.value_targets!r} is not one of {', '.join(VALUE_TARGETS)}")
        check_field(self.value_samples >= 1, "value_samples", f"must be at least 1, got {self.value_samples}")
        check_field(self.value_targets != "reference_samples" or self.advantages == "value_head", "value_targets",
                    "reference_samples are the value head's targets: add --advantages value_head")

    def weighs_examples(self) -> bool:
        """--advantages or --sampling_strategy set away from its default."""
        return self.advantages != "auto" or self.sampling_strategy != "random"
