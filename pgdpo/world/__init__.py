"""Procedural shapes world: prompt grammar, clip renderer and rule-based oracle."""

from pgdpo.world.grammar import (
    ATTRIBUTE_NAMES,
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    SHAPES,
    Attributes,
    all_attributes,
    format_prompt,
    parse_prompt,
    split_prompts,
)
from pgdpo.world.oracle import Detection, alignment, detect
from pgdpo.world.render import render_batch, render_clip

__all__ = [
    "ATTRIBUTE_NAMES",
    "BACKGROUND",
    "COLORS",
    "DIRECTIONS",
    "SHAPES",
    "Attributes",
    "Detection",
    "alignment",
    "all_attributes",
    "detect",
    "format_prompt",
    "parse_prompt",
    "render_batch",
    "render_clip",
    "split_prompts",
]
