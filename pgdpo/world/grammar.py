"""Prompt grammar of the shapes world: "a <color> <shape> moving <direction>".

The grammar has 5 colours, 3 shapes and 4 directions, so 60 prompts in all.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import asdict, dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Pure RGB primaries and secondaries. Every pair differs by 255 in at least one
# channel, so the colours stay apart after blur, noise and yuv420p chroma
# subsampling. Each colour has a maximum channel of 255, so every shape is
# equally bright for the oracle's brightness cut. The background is black.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Directions in image coordinates: "up" moves towards row 0.
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")

ATTRIBUTE_NAMES: tuple[str, ...] = ("color", "shape", "direction")

PROMPT_TEMPLATE = "a {color} {shape} moving {direction}"


@dataclass(frozen=True)
class Attributes:
    """One point of the grammar: the colour, shape and motion direction of a clip."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        choices = {"color": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(
                    f"Invalid {name} {value!r}: expected one of {', '.join(allowed)}."
                )

    def as_dict(self) -> dict[str, str]:
        """Return the attributes as a dict keyed by ATTRIBUTE_NAMES."""
        return asdict(self)


def format_prompt(attrs: Attributes) -> str:
    """Return the prompt for `attrs`, e.g. "a red circle moving left"."""
    return PROMPT_TEMPLATE.format(**attrs.as_dict())


def parse_prompt(prompt: str) -> Attributes:
    """Parse a prompt written by format_prompt back into Attributes.

    Case and runs of whitespace are ignored. Raises ValueError naming the prompt
    and the grammar when the text is not a prompt of the grammar.
    """
    words = prompt.lower().split()

    parses = (
        len(words) == 5
        and words[0] == "a"
        and words[1] in COLORS
        and words[2] in SHAPES
        and words[3] == "moving"
        and words[4] in DIRECTIONS
    )
    if not parses:
        raise ValueError(
            f"Invalid prompt {prompt!r}: expected '{PROMPT_TEMPLATE}' with color in "
            f"{{{', '.join(COLORS)}}}, shape in {{{', '.join(SHAPES)}}} and "
            f"direction in {{{', '.join(DIRECTIONS)}}}."
        )

    return Attributes(color=words[1], shape=words[2], direction=words[4])


def all_attributes() -> list[Attributes]:
    """Return all 60 attribute combinations, colour-major in the order of COLORS, SHAPES, DIRECTIONS."""
    return [
        Attributes(color, shape, direction)
        for color, shape, direction in itertools.product(COLORS, SHAPES, DIRECTIONS)
    ]


def max_eval_combos() -> int:
    """Return the largest number of (colour, shape) pairs that can be held out for eval."""
    # Train keeps at least one (colour, shape) pair per colour and per shape.
    # With 5 colours and 3 shapes, 5 pairs can cover all of them, so at most
    # 15 - 5 = 10 pairs can be held out.
    return len(COLORS) * len(SHAPES) - max(len(COLORS), len(SHAPES))


def _covers_all(pairs: list[tuple[str, str]]) -> bool:
    colors = {color for color, _ in pairs}
    shapes = {shape for _, shape in pairs}
    return len(colors) == len(COLORS) and len(shapes) == len(SHAPES)


def split_prompts(num_eval_combos: int, seed: int) -> tuple[list[str], list[str]]:
    """Split the 60 prompts into train and eval by holding out (colour, shape) pairs.

    Draws `num_eval_combos` (colour, shape) pairs uniformly among the choices that
    leave every colour and every shape in train, using numpy's default_rng(seed).
    All 4 directions of a held-out pair go to eval, and the other prompts go to
    train. Returns (train, eval), each sorted. The same seed gives the same split.
    Raises ValueError unless 1 <= num_eval_combos <= 10.
    """
    max_combos = max_eval_combos()
    if not 1 <= num_eval_combos <= max_combos:
        raise ValueError(
            f"Invalid num_eval_combos {num_eval_combos}: expected 1 to {max_combos}, "
            "so that eval is not empty and every colour and shape stays in train."
        )

    # The grammar has only 15 pairs, so enumerating every valid held-out set
    # (at most C(15, 7) = 6435) and drawing one of them is cheap and exact.
    pairs = list(itertools.product(COLORS, SHAPES))
    candidates = []
    for held_out in itertools.combinations(pairs, num_eval_combos):
        train_pairs = [pair for pair in pairs if pair not in held_out]
        if _covers_all(train_pairs):
            candidates.append(held_out)

    rng = np.random.default_rng(seed)
    held_out = set(candidates[int(rng.integers(len(candidates)))])

    train, evaluation = [], []
    for attrs in all_attributes():
        target = evaluation if (attrs.color, attrs.shape) in held_out else train
        target.append(format_prompt(attrs))

    logger.debug(
        "Held out %d (color, shape) pairs with seed %d: %s",
        num_eval_combos,
        seed,
        sorted(held_out),
    )
    return sorted(train), sorted(evaluation)
