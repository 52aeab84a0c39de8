"""Rule-based oracle that reads colour, shape and direction back from a shapes-world clip.

It is meant for rendered clips and for generated or compressed copies of them
(blur, pixel noise, H.264 yuv420p), and reports None for an attribute it cannot decide.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from pgdpo.world.grammar import ATTRIBUTE_NAMES, COLORS, Attributes

logger = logging.getLogger(__name__)

# A pixel whose maximum channel exceeds this value (0 to 255) counts as bright.
# A clip without bright pixels has no foreground. For Gaussian noise of sigma 8
# on black, this cut is 8 sigma away.
FOREGROUND_THRESHOLD = 64

# Blur spreads a shape's edge over a few pixels. Cutting at this fraction of
# the shape's typical brightness puts the mask edge back where the sharp edge was.
HALF_MAX_FRACTION = 0.5

# The fill ratio is measured on a window upsampled by this factor with bilinear
# interpolation, so the mask edge is placed to a fraction of a pixel.
UPSAMPLING = 4

# Skewness of the brightness along the rows: about -0.56 for the upright
# triangle, whose mass sits at the base, and 0 for the symmetric circle and
# square. Blur shrinks its magnitude. On 32 x 32 test clips with 9 to 14 px
# shapes, noise of sigma 8, a 3 x 3 blur and H.264 (crf 18) left it at 0.32 or
# more for triangles and under 0.03 for the other shapes.
TRIANGLE_MIN_ABS_SKEWNESS = 0.2

# Fill ratio of the mask inside its bounding box: circle pi / 4 ~ 0.785 and
# square 1.0. Blur rounds the square's corners, so the cut sits below the
# midpoint. On the same test clips circles stayed under 0.83 and squares above 0.89.
CIRCLE_SQUARE_CUT = 0.85

# Frames with fewer foreground pixels than this are skipped for shape and motion.
MIN_FRAME_PIXELS = 4

# Width (px) of the ring around each frame's foreground that still counts
# towards the brightness moments, so the blurred rim is not cut off.
MOMENT_MARGIN_PX = 2

# A fitted displacement over the clip shorter than this (px) gives direction None.
MIN_DISPLACEMENT_PX = 1.0


@dataclass
class Detection:
    """Attributes read from a clip, each None when undecidable.

    foreground_fraction is the share of all pixels in the clip, in [0, 1], that
    belong to the detected shape.
    """

    color: str | None
    shape: str | None
    direction: str | None
    foreground_fraction: float


def _validate_clip(clip: np.ndarray) -> None:
    if not isinstance(clip, np.ndarray) or clip.dtype != np.uint8:
        found = clip.dtype if isinstance(clip, np.ndarray) else type(clip).__name__
        raise TypeError(
            f"Invalid clip dtype {found}: expected a numpy uint8 array. "
            "Convert with np.clip(clip, 0, 255).astype(np.uint8)."
        )
    if clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(
            f"Invalid clip shape {clip.shape}: expected (frames, height, width, 3) RGB."
        )


def _edge_threshold(brightness: np.ndarray) -> float | None:
    """Return the brightness cut for the shape's edge, or None when nothing is bright.

    `brightness` is the maximum channel per pixel, shape (F, H, W), in 0 to 255.
    """
    bright = brightness > FOREGROUND_THRESHOLD
    if not bright.any():
        return None

    level = float(np.median(brightness[bright]))
    return max(float(FOREGROUND_THRESHOLD), HALF_MAX_FRACTION * level)


@functools.lru_cache(maxsize=16)
def _bilinear_taps(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return lower index, upper index and upper weight per output pixel along one axis.

    Output pixel k samples input coordinate (k + 0.5) / UPSAMPLING - 0.5, so
    pixel areas line up, and coordinates past the edge repeat the edge pixel.
    """
    positions = (np.arange(size * UPSAMPLING) + 0.5) / UPSAMPLING - 0.5
    positions = np.clip(positions, 0.0, size - 1)
    lower = np.floor(positions).astype(np.intp)
    upper = np.minimum(lower + 1, size - 1)
    return lower, upper, positions - lower


def _upsample(image: np.ndarray) -> np.ndarray:
    """Upsample an (H, W) image bilinearly to (H * UPSAMPLING, W * UPSAMPLING).

    Uses indexing and elementwise arithmetic only, because OpenBLAS threads made
    a matrix-product version about 10 times slower on a busy 2-core machine.
    """
    height, width = image.shape

    lower, upper, weight = _bilinear_taps(height)
    weight = weight[:, None]
    rows = image[lower, :] * (1.0 - weight) + image[upper, :] * weight

    lower, upper, weight = _bilinear_taps(width)
    return rows[:, lower] * (1.0 - weight) + rows[:, upper] * weight


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected region of a 2-D bool mask, dropping specks."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return mask

    sizes = np.bincount(labels.reshape(-1))[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _fill_ratio(mask: np.ndarray) -> float:
    """Return the share of the mask's bounding box that the mask covers."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    box_area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    return float(mask.sum()) / float(box_area)


def _row_moments(weights: np.ndarray) -> tuple[float, float, float]:
    """Return the weighted centroid (row, col) in px and the skewness along the rows.

    Symmetric blur leaves the centroid and the third central moment unchanged,
    which makes both robust features for blurred clips.
    """
    rows, cols = np.indices(weights.shape, dtype=np.float64)
    total = weights.sum()
    row_mean = float((weights * rows).sum() / total)
    col_mean = float((weights * cols).sum() / total)

    variance = (weights * (rows - row_mean) ** 2).sum() / total
    third = (weights * (rows - row_mean) ** 3).sum() / total
    skewness = float(third / variance**1.5) if variance > 1e-9 else 0.0
    return row_mean, col_mean, skewness


@dataclass
class _FrameShape:
    """Measurements of the shape in one frame. The centroid is (row, col) in px."""

    fill_ratio: float
    skewness: float
    centroid: tuple[float, float]


def _measure_frame(frame: np.ndarray, threshold: float) -> tuple[np.ndarray, _FrameShape | None]:
    """Segment one frame's brightness (H, W) and measure its shape.

    Returns the foreground mask (H, W) and the measurements, or None for them
    when the frame has fewer than MIN_FRAME_PIXELS foreground pixels.
    """
    foreground = _largest_region(frame > threshold)
    if foreground.sum() < MIN_FRAME_PIXELS:
        return foreground, None

    # Pixels around the region, so the blurred rim counts towards the moments
    # and the upsampled window contains the whole edge.
    support = ndimage.binary_dilation(foreground, iterations=MOMENT_MARGIN_PX)
    row, col, skewness = _row_moments(np.where(support, frame, 0.0))

    # Refine the mask on an upsampled window around the region for the fill ratio.
    rows = np.flatnonzero(support.any(axis=1))
    cols = np.flatnonzero(support.any(axis=0))
    window = frame[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    region = _largest_region(_upsample(window) > threshold)
    if not region.any():
        # A thin region of pixels just above the cut can vanish when upsampled.
        region = foreground

    measurements = _FrameShape(
        fill_ratio=_fill_ratio(region),
        skewness=skewness,
        centroid=(row, col),
    )
    return foreground, measurements


def _classify_color(clip: np.ndarray, foreground: np.ndarray) -> str | None:
    pixels = clip[foreground].astype(np.float64)
    if len(pixels) == 0:
        return None

    # Compare hue, not brightness: scale the median colour so its maximum channel
    # is 255, since a dim or blurred red is still red.
    median = np.median(pixels, axis=0)
    peak = median.max()
    if peak <= 0:
        return None
    normalized = median * (255.0 / peak)

    names = list(COLORS)
    palette = np.asarray([COLORS[name] for name in names], dtype=np.float64)
    distances = np.linalg.norm(palette - normalized, axis=1)
    return names[int(np.argmin(distances))]


def _classify_shape(measured: list[_FrameShape]) -> str | None:
    if not measured:
        return None

    # NOTE: a triangle pointing down also has a large |skewness| and is
    # classified as a triangle, although the renderer draws only upright ones.
    skewness = float(np.median([item.skewness for item in measured]))
    if abs(skewness) >= TRIANGLE_MIN_ABS_SKEWNESS:
        return "triangle"

    fill_ratio = float(np.median([item.fill_ratio for item in measured]))
    if fill_ratio < CIRCLE_SQUARE_CUT:
        return "circle"
    return "square"


def _classify_direction(
    frame_indices: list[int], measured: list[_FrameShape], num_frames: int
) -> str | None:
    if len(measured) < 2:
        return None

    # Least-squares slope of the centroid in px per frame, over the measured frames.
    centroids = np.asarray([item.centroid for item in measured])
    slope_row, slope_col = np.polyfit(np.asarray(frame_indices, dtype=np.float64), centroids, 1)[0]

    # Displacement that the fit predicts between the first and the last frame.
    dx = slope_col * (num_frames - 1)
    dy = slope_row * (num_frames - 1)
    if max(abs(dx), abs(dy)) < MIN_DISPLACEMENT_PX:
        return None

    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def detect(clip: np.ndarray) -> Detection:
    """Read colour, shape and direction from a uint8 RGB clip of shape (F, H, W, 3).

    Per frame, the foreground is the largest connected region brighter than
    half the shape's median brightness (and above FOREGROUND_THRESHOLD).
    Colour is the palette entry nearest to the median foreground colour after
    scaling it to a maximum channel of 255. Shape is "triangle" when the
    brightness is skewed along the rows, otherwise circle or square by the
    fill ratio of the mask in its bounding box, each a median over frames.
    Direction is the main axis and sign of a least-squares fit of the centroid
    over frames. Every field is None for a clip without foreground. Shape is
    None when no frame has MIN_FRAME_PIXELS foreground pixels, and direction
    when fewer than 2 frames do or the motion is shorter than MIN_DISPLACEMENT_PX.
    """
    _validate_clip(clip)

    num_frames = clip.shape[0]
    brightness = clip.max(axis=-1).astype(np.float64)
    threshold = _edge_threshold(brightness)
    if threshold is None:
        return Detection(color=None, shape=None, direction=None, foreground_fraction=0.0)

    foreground = np.zeros(brightness.shape, dtype=bool)
    frame_indices: list[int] = []
    measured: list[_FrameShape] = []
    for index in range(num_frames):
        foreground[index], measurements = _measure_frame(brightness[index], threshold)
        if measurements is not None:
            frame_indices.append(index)
            measured.append(measurements)

    detection = Detection(
        color=_classify_color(clip, foreground),
        shape=_classify_shape(measured),
        direction=_classify_direction(frame_indices, measured, num_frames),
        foreground_fraction=float(foreground.mean()),
    )
    logger.debug("Detected %s", detection)
    return detection


def alignment(detection: Detection, attrs: Attributes) -> dict[str, float]:
    """Score a detection against the prompted attributes.

    Returns 1.0 or 0.0 per name in ATTRIBUTE_NAMES (None scores 0.0), and
    "overall", the mean of the three.
    """
    scores = {
        name: float(getattr(detection, name) == getattr(attrs, name))
        for name in ATTRIBUTE_NAMES
    }
    scores["overall"] = sum(scores.values()) / len(ATTRIBUTE_NAMES)
    return scores
