"""Rendering of shapes-world clips: one filled shape moving in a straight line on black."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from pgdpo.world.grammar import COLORS, Attributes

logger = logging.getLogger(__name__)

# Shape size (side of its bounding box) and speed, as fractions of the shorter
# frame side. For a 32 x 32 frame this gives 9 to 14 px and 1 to 2 px per frame.
MIN_SIZE_FRACTION = 9 / 32
MAX_SIZE_FRACTION = 14 / 32
MIN_SPEED_FRACTION = 1 / 32
MAX_SPEED_FRACTION = 2 / 32

# Empty pixels kept between the shape and each frame border, so no shape is cut.
BORDER_MARGIN_PX = 1.0

# Each pixel is sampled on a SUPERSAMPLING x SUPERSAMPLING grid for anti-aliasing.
SUPERSAMPLING = 4

_DIRECTION_STEPS = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}


def _validate_clip_size(num_frames: int, height: int, width: int) -> None:
    if num_frames < 2:
        raise ValueError(
            f"Invalid num_frames {num_frames}: a clip needs at least 2 frames to show motion."
        )
    if height < 16 or width < 16:
        raise ValueError(
            f"Invalid frame size {height}x{width}: height and width must be at least 16 px."
        )

    # The largest shape moving at the lowest speed must still fit inside the margins.
    side = min(height, width)
    travel = MIN_SPEED_FRACTION * side * (num_frames - 1)
    needed = MAX_SIZE_FRACTION * side + travel + 2 * BORDER_MARGIN_PX
    if needed > side:
        raise ValueError(
            f"Invalid clip size: {num_frames} frames of {height}x{width} px leave no room "
            f"for the motion ({needed:.1f} px needed along a {side} px side). "
            "Use fewer frames or a larger frame."
        )


def _sample_path(
    direction: str, size: float, rng: np.random.Generator, num_frames: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw a speed and a start, and return the box corners (left, top) per frame, each shape (F,) in px."""
    side = min(height, width)
    step_x, step_y = _DIRECTION_STEPS[direction]

    # Cap the speed so the whole path stays inside the margins.
    room = side - size - 2 * BORDER_MARGIN_PX
    max_speed = min(MAX_SPEED_FRACTION * side, room / (num_frames - 1))
    speed = rng.uniform(MIN_SPEED_FRACTION * side, max_speed)
    travel = speed * (num_frames - 1)

    # Along the motion axis the box sweeps size + travel px, and across it only size px.
    corners = []
    for step, extent in ((step_x, width), (step_y, height)):
        swept = size + abs(step) * travel
        first = rng.uniform(BORDER_MARGIN_PX, extent - BORDER_MARGIN_PX - swept)
        if step < 0:
            first += travel
        corners.append(first + step * speed * np.arange(num_frames))

    return corners[0], corners[1]


def _coverage(
    shape: str, left: np.ndarray, top: np.ndarray, size: float, height: int, width: int
) -> np.ndarray:
    """Return the fraction of each pixel covered by the shape, shape (F, H, W), in [0, 1].

    `left` and `top` have shape (F,) and give the bounding-box corner in px, where
    pixel (row i, column j) spans [j, j + 1) x [i, i + 1).
    """
    offsets = (np.arange(SUPERSAMPLING) + 0.5) / SUPERSAMPLING
    xs = (np.arange(width)[:, None] + offsets).reshape(-1)
    ys = (np.arange(height)[:, None] + offsets).reshape(-1)

    # Sample positions relative to each frame's bounding box: (F, 1, W*S) and (F, H*S, 1).
    u = xs[None, None, :] - left[:, None, None]
    v = ys[None, :, None] - top[:, None, None]

    if shape == "circle":
        radius = size / 2
        inside = (u - radius) ** 2 + (v - radius) ** 2 <= radius**2
    elif shape == "square":
        inside = (u >= 0) & (u <= size) & (v >= 0) & (v <= size)
    elif shape == "triangle":
        # Isosceles, apex at the top centre and base along the bottom edge, so the
        # half-width grows from 0 at the apex to size / 2 at the base.
        inside = (v >= 0) & (v <= size) & (np.abs(u - size / 2) <= v / 2)
    else:
        raise ValueError(f"Unknown shape {shape!r}: expected circle, square or triangle.")

    frames = inside.shape[0]
    blocks = inside.reshape(frames, height, SUPERSAMPLING, width, SUPERSAMPLING)
    return blocks.mean(axis=(2, 4))


def render_clip(
    attrs: Attributes,
    rng: np.random.Generator,
    num_frames: int = 9,
    height: int = 32,
    width: int = 32,
) -> np.ndarray:
    """Render one clip of `attrs`, returning uint8 RGB of shape (num_frames, height, width, 3).

    The shape has a random size, a random start and a constant random speed
    along the direction. On a 32 px side the size is 9 to 14 px and the speed
    1 to 2 px per frame, and both scale with the shorter side. For long clips
    the maximum speed is lowered so the path fits. The shape stays at least
    1 px away from every border in every frame, and its edges are anti-aliased.
    The same rng state gives the same clip, and the call advances `rng`.
    Raises ValueError when the clip size leaves no room for the motion.
    """
    _validate_clip_size(num_frames, height, width)

    side = min(height, width)
    size = rng.uniform(MIN_SIZE_FRACTION * side, MAX_SIZE_FRACTION * side)
    left, top = _sample_path(attrs.direction, size, rng, num_frames, height, width)

    coverage = _coverage(attrs.shape, left, top, size, height, width)

    color = np.asarray(COLORS[attrs.color], dtype=np.float64)
    clip = np.rint(coverage[..., None] * color)
    return clip.astype(np.uint8)


def render_batch(attrs_list: Sequence[Attributes], seed: int, **kw) -> np.ndarray:
    """Render one clip per entry of `attrs_list` from a single default_rng(seed).

    Keyword arguments go to render_clip. Returns uint8 of shape (N, F, H, W, 3),
    with N = 0 for an empty list.
    """
    rng = np.random.default_rng(seed)
    clips = [render_clip(attrs, rng, **kw) for attrs in attrs_list]

    if not clips:
        num_frames = kw.get("num_frames", 9)
        height = kw.get("height", 32)
        width = kw.get("width", 32)
        _validate_clip_size(num_frames, height, width)
        return np.zeros((0, num_frames, height, width, 3), dtype=np.uint8)

    logger.debug("Rendered %d clips of shape %s with seed %d", len(clips), clips[0].shape, seed)
    return np.stack(clips)
