"""prefuse's objectives: pure functions of sequence-level statistics, looked up by name.

from prefuse.algorithms import objective_loss, list_objectives, get_objective
"""

# Importing the family modules fills the registry.
from . import alol, dpo, kto, mixed, ofs, online, reference_free, srpo  # noqa: F401
from .api import objective_loss
from .registry import ObjectiveSpec, get_objective, list_objectives, register

__all__ = ["objective_loss", "list_objectives", "get_objective", "ObjectiveSpec", "register"]
