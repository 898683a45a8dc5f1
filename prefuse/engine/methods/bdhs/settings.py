"""BDHS's section of `prefuse train`'s settings: online avg_dpo's y~- from BDHS (--avg_rejected bdhs); the rollout
settings (max_new_tokens, temperature, top_p) are the online section's."""
from __future__ import annotations

from dataclasses import dataclass

from prefuse.engine.checks import setting
from prefuse.engine.methods.bdhs.sampler import BDHSConfig


@dataclass
class BDHSSettings:
    rho_th: float = setting(0.99, "--avg_rejected bdhs: a masked token stays visible iff rho ~ U(0,1) >= rho_th")
    epsilon_s: float = setting(0.97, "--avg_rejected bdhs: accept y~- below this cosine similarity to y+")
    n_bdhs: int = setting(5, "--avg_rejected bdhs: attempts at most (the last unguided)")
    embedder: str = setting("all-MiniLM-L6-v2", "--avg_rejected bdhs: the sentence embedder (packaged "
                                                "all-MiniLM-L6-v2, a local sentence-transformers directory, lexical)")

    def check(self) -> None:
        """rho_th, epsilon_s and n_bdhs as BDHSConfig checks them: ValueError `rho_th: must be in [0, 1], ...`."""

        BDHSConfig(rho_th=self.rho_th, epsilon_s=self.epsilon_s, n_bdhs=self.n_bdhs).validate()
