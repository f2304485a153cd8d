"""Training objectives: batch + model -> (loss, metrics), the glue between models and losses."""

from jaxpref.objectives import grpo as _grpo  # noqa: F401  (registers "grpo")
from jaxpref.objectives import kd as _kd  # noqa: F401  (registers "kd")
from jaxpref.objectives import kto as _kto  # noqa: F401  (registers "kto")
from jaxpref.objectives import preference as _preference  # noqa: F401  (registers dpo, ipo, orpo, simpo)
from jaxpref.objectives import reward as _reward  # noqa: F401  (registers "reward")
from jaxpref.objectives import sft as _sft  # noqa: F401  (registers "sft")
from jaxpref.objectives.base import Batch, Metrics, Objective
from jaxpref.objectives.registry import (
    build_objective,
    get_objective_builder,
    known_objectives,
    register_objective,
)

__all__ = [
    "Batch",
    "Metrics",
    "Objective",
    "build_objective",
    "get_objective_builder",
    "known_objectives",
    "register_objective",
]
