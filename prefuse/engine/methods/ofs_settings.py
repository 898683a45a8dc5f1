"""OFS-DPO's and COFS-DPO's section of `prefuse train`'s settings: the two adapters (engine/methods/ofs_adapters.py)
and the domains trained one after another (prefuse/commands/cofs.py)."""
from __future__ import annotations

from dataclasses import dataclass

from prefuse.engine.checks import check_field, setting

SWAP_MODES = ("roles", "params")


@dataclass
class OFSSettings:
    ofs_slow_lr_ratio: float = setting(0.1, "ofs_dpo: the slow adapter's learning rate = learning_rate * this")
    ofs_chasing_interval: int = setting(50, "ofs_dpo: steps between two checks of the role-swap criterion")
    ofs_swap_mode: str = setting("roles", "ofs_dpo: roles (the F role moves to the other adapter) or params (the "
                                          "adapters' weights swap)")
    domains: list[str] | None = setting(None, "COFS-DPO: preference files trained on one after another (each "
                                              "stage starts from the last one's adapters)")
    domain_weights: list[float] | None = setting(None, "COFS-DPO: lambda_k of the combined fast adapters (default: "
                                                       "uniform)")

    def check(self) -> None:
        """One-line ValueErrors naming the field."""
        check_field(self.ofs_slow_lr_ratio > 0, "ofs_slow_lr_ratio", f"must be positive, got {self.ofs_slow_lr_ratio}")
        check_field(self.ofs_chasing_interval >= 1, "ofs_chasing_interval",
                    f"must be at least 1, got {self.ofs_chasing_interval}")
        check_field(self.ofs_swap_mode in SWAP_MODES, "ofs_swap_mode", f"{self.ofs_swap_mode!r} is not roles or params")
        check_field(not self.domains, "domains", "domain after domain is prefuse.commands.cofs.train_domains "
                                                 "(prefuse train --domains), not train()")
