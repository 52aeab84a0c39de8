"""Per-clip scorers and their registry.

Importing this package registers the built-in scorers: temporal_flickering,
motion_smoothness and dynamic_degree (quality), and oracle_color, oracle_shape,
oracle_direction and oracle_alignment (semantic, shapes world only).
"""

from pgdpo.scoring import oracle, temporal
from pgdpo.scoring.registry import (
    FunctionScorer,
    Scorer,
    available_scorers,
    get_scorer,
    omni_total,
    register,
    register_scorer,
    weighted_total,
)

__all__ = [
    "FunctionScorer",
    "Scorer",
    "available_scorers",
    "get_scorer",
    "omni_total",
    "oracle",
    "register",
    "register_scorer",
    "temporal",
    "weighted_total",
]
