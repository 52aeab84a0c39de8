"""Oracle scorers for the built-in shapes world, backed by pgdpo.world's detector.

Each scorer parses the prompt ("a <color> <shape> moving <direction>") and
detects the shape in the clip. oracle_color, oracle_shape and oracle_direction
return 1.0 when that attribute matches, else 0.0. oracle_alignment returns
pgdpo.world.alignment's "overall" value.
pgdpo.world is imported inside the functions, so the other scorers work without it.
"""

from __future__ import annotations

import numpy as np

from pgdpo.scoring.registry import register, validate_clip

# Keys of pgdpo.world.alignment's result, one per registered scorer.
ORACLE_KEYS: tuple[str, ...] = ("color", "shape", "direction", "overall")


def oracle_scores(frames: np.ndarray, prompt: str) -> dict[str, float]:
    """Detect the shape in `frames` and compare it with the attributes of `prompt`.

    Returns the "color", "shape", "direction" and "overall" values of
    pgdpo.world.alignment as floats. Raises ValueError naming the prompt when it is
    not a shapes-world prompt.
    """
    from pgdpo.world import alignment, detect, parse_prompt

    validate_clip(frames)
    try:
        attrs = parse_prompt(prompt)
    except ValueError as error:
        raise ValueError(
            f"Prompt {prompt!r} is not in the shapes-world grammar, and oracle scorers only apply "
            f"to shapes-world prompts. Use another scorer for this prompt. Parser: {error}"
        ) from error

    result = alignment(detect(frames), attrs)
    missing = [key for key in ORACLE_KEYS if key not in result]
    if missing:
        raise ValueError(
            f"pgdpo.world.alignment returned keys {sorted(result)} for prompt {prompt!r}, "
            f"missing {missing}."
        )
    return {key: float(result[key]) for key in ORACLE_KEYS}


@register("oracle_color", group="semantic", needs={"frames", "prompt"})
def oracle_color(frames: np.ndarray, prompt: str) -> float:
    """Return 1.0 if the detected colour matches the prompt's colour, else 0.0."""
    return oracle_scores(frames, prompt)["color"]


@register("oracle_shape", group="semantic", needs={"frames", "prompt"})
def oracle_shape(frames: np.ndarray, prompt: str) -> float:
    """Return 1.0 if the detected shape matches the prompt's shape, else 0.0."""
    return oracle_scores(frames, prompt)["shape"]


@register("oracle_direction", group="semantic", needs={"frames", "prompt"})
def oracle_direction(frames: np.ndarray, prompt: str) -> float:
    """Return 1.0 if the detected motion direction matches the prompt's direction, else 0.0."""
    return oracle_scores(frames, prompt)["direction"]


@register("oracle_alignment", group="semantic", needs={"frames", "prompt"})
def oracle_alignment(frames: np.ndarray, prompt: str) -> float:
    """Return pgdpo.world.alignment's "overall" value, 1.0 when colour, shape and direction all match.

    NOTE: pgdpo.world currently defines "overall" as the mean of the three matches,
    so a clip with one wrong attribute scores 2/3, not 0.
    """
    return oracle_scores(frames, prompt)["overall"]
