"""Per-clip scorers and their registry.

Importing this package registers the built-in scorers: temporal_flickering,
motion_smoothness and dynamic_degree (quality), oracle_color, oracle_shape,
oracle_direction and oracle_alignment (semantic, shapes world only), and the
open_clip scorers clip_score and appearance_style (semantic), background_consistency
and aesthetic_quality (quality), which need the "clip" or "aesthetic" resource.
"""

from pgdpo.scoring import clip, oracle, temporal
from pgdpo.scoring.registry import (
    FunctionScorer,
    Scorer,
    available_scorers,
    get_scorer,
    load_resources,
    omni_total,
    register,
    register_resource,
    register_scorer,
    weighted_total,
)

__all__ = [
    "FunctionScorer",
    "Scorer",
    "available_scorers",
    "clip",
    "get_scorer",
    "load_resources",
    "omni_total",
    "oracle",
    "register",
    "register_resource",
    "register_scorer",
    "temporal",
    "weighted_total",
]
