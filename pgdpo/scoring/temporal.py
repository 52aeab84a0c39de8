"""Weight-free temporal quality scorers modelled on VBench's dimensions.

temporal_flickering follows VBench's formula exactly. motion_smoothness and
dynamic_degree follow VBench's protocols, but replace its learned networks (AMT
frame interpolation and RAFT optical flow) with OpenCV's Farneback optical flow,
so their values approximate VBench's and are not interchangeable with them.
The definitions follow VBench's vbench/temporal_flickering.py and
vbench/motion_smoothness.py at commit 00c4b29, and vbench/dynamic_degree.py at
commit 11abda9 (github.com/Vchitect/VBench).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

from pgdpo.scoring.registry import register, validate_clip

logger = logging.getLogger(__name__)

# Farneback settings: a 3-level pyramid at half scale, 15 px averaging windows,
# 3 iterations, and a polynomial expansion over 5 px neighbourhoods with a 1.2 px
# Gaussian. These values are common in OpenCV dense-flow examples.
# Measured on a 64 x 64 blurred-noise texture translating at a constant speed, the
# mean magnitude is within 1% of the true shift from 1 to 8 px per frame. At 12 to
# 20 px per frame it is only about 4 px.
FARNEBACK_PARAMS = {
    "pyr_scale": 0.5,
    "levels": 3,
    "winsize": 15,
    "iterations": 3,
    "poly_n": 5,
    "poly_sigma": 1.2,
    "flags": 0,
}

# dynamic_degree constants from VBench: the flow of a frame pair is the mean of
# its top 5% magnitudes, and the threshold is 6 px on a 256 px shorter side.
TOP_FLOW_FRACTION = 0.05
DYNAMIC_THRESHOLD_PX_AT_256 = 6.0
# VBench samples frames to about this rate before measuring flow.
DYNAMIC_SAMPLE_FPS = 8.0


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def optical_flow(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Estimate Farneback flow from RGB frame `first` to `second`, float32 (H, W, 2) as (dx, dy) in px.

    The flow maps each pixel (x, y) of `first` to (x + dx, y + dy) in `second`.
    """
    return cv2.calcOpticalFlowFarneback(_gray(first), _gray(second), None, **FARNEBACK_PARAMS)


def _flow_magnitude(flow: np.ndarray) -> np.ndarray:
    return np.hypot(flow[..., 0], flow[..., 1])


@register("temporal_flickering", group="quality", needs={"frames"})
def temporal_flickering(frames: np.ndarray) -> float:
    """Score frame-to-frame stability: (255 - mean |frame[t+1] - frame[t]|) / 255.

    The mean runs over all consecutive pairs, pixels and channels, as in VBench,
    which applies this dimension to prompts of static scenes. A clip with
    identical frames scores exactly 1.0, and any change lowers the score.
    Needs at least 2 frames.
    """
    validate_clip(frames, min_frames=2)
    differences = np.abs(np.diff(frames.astype(np.int16), axis=0))
    mean_difference = float(differences.mean(dtype=np.float64))
    return (255.0 - mean_difference) / 255.0


def mean_flow_magnitude(frames: np.ndarray) -> float:
    """Return the mean Farneback flow magnitude in px per frame over all pixels and consecutive pairs."""
    validate_clip(frames, min_frames=2)
    magnitudes = [_flow_magnitude(optical_flow(first, second)).mean() for first, second in zip(frames[:-1], frames[1:])]
    return float(np.mean(magnitudes))


def _interpolate_midpoint(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Predict the frame halfway between RGB frames `first` and `second`, as uint8.

    With forward flow F01 and backward flow F10, the flows from the middle frame to
    its neighbours are approximated as Ft0 = (F10 - F01) / 4 and Ft1 = (F01 - F10) / 4.
    Under linear motion F10 = -F01, so these are -F01 / 2 and +F01 / 2. Both
    neighbours are warped to the middle with these flows and averaged.
    """
    forward = optical_flow(first, second)
    backward = optical_flow(second, first)
    to_first = (backward - forward) / 4.0
    to_second = -to_first

    height, width = first.shape[:2]
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    warped = []
    for frame, flow in ((first, to_first), (second, to_second)):
        map_x = grid_x + flow[..., 0]
        map_y = grid_y + flow[..., 1]
        warped.append(
            cv2.remap(frame, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        )

    mean = (warped[0].astype(np.float32) + warped[1].astype(np.float32)) / 2.0
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


@register("motion_smoothness", group="quality", needs={"frames"})
def motion_smoothness(frames: np.ndarray) -> float:
    """Score how well the odd frames follow from their even neighbours by interpolation.

    VBench's protocol: keep the even frames 0, 2, 4, ..., rebuild each odd frame
    that has an even frame on both sides, and return (255 - mean |rebuilt - odd|) / 255
    averaged over the rebuilt frames. Smooth motion scores near 1.
    NOTE: VBench interpolates with the AMT network. This implementation uses a
    weight-free Farneback-flow interpolator (_interpolate_midpoint). On a 64 x 64
    translating texture it scores above 0.996 up to 3 px per frame, but about 0.89
    from 5 px per frame, where kept frames lie 10 px apart.
    Needs at least 3 frames.
    """
    validate_clip(frames, min_frames=3)
    errors = []
    for odd in range(1, frames.shape[0] - 1, 2):
        rebuilt = _interpolate_midpoint(frames[odd - 1], frames[odd + 1])
        errors.append(np.abs(rebuilt.astype(np.int16) - frames[odd].astype(np.int16)).mean(dtype=np.float64))
    return (255.0 - float(np.mean(errors))) / 255.0


def top_flow_magnitudes(frames: np.ndarray) -> list[float]:
    """Return, per consecutive frame pair, the mean of the top 5% Farneback flow magnitudes in px."""
    validate_clip(frames, min_frames=2)
    scores = []
    for first, second in zip(frames[:-1], frames[1:]):
        magnitudes = np.sort(_flow_magnitude(optical_flow(first, second)).ravel())[::-1]
        top_count = max(1, int(magnitudes.size * TOP_FLOW_FRACTION))
        scores.append(float(magnitudes[:top_count].mean()))
    return scores


def dynamic_degree(frames: np.ndarray, fps: float = DYNAMIC_SAMPLE_FPS) -> float:
    """Return 1.0 if the clip counts as dynamic under VBench's rule, else 0.0.

    VBench's protocol keeps every round(fps / 8)-th frame (at least every frame) and
    measures each consecutive pair by the mean of its top 5% flow magnitudes. The
    clip is dynamic when at least round(4 * n / 16) pairs exceed a threshold of
    max(1, 8 / fps) * 6.0 * min(H, W) / 256 px, where n is the number of kept frames.
    VBench's dimension score is the fraction of dynamic clips, which is the mean of
    this value over clips.
    NOTE: VBench measures flow with RAFT. Farneback underestimates shifts of more
    than about 8 px per frame (see FARNEBACK_PARAMS). For a shorter side above
    about 340 px the threshold itself exceeds 8 px, so fast clips may be missed.
    Unlike VBench, at least 1 pair must exceed the threshold: VBench's count
    rounds to 0 for fewer than 3 kept frames, which would make every such clip dynamic.
    """
    validate_clip(frames, min_frames=2)
    if not fps > 0:
        raise ValueError(f"Invalid fps {fps!r}: expected a positive frame rate.")

    interval = max(1, round(fps / DYNAMIC_SAMPLE_FPS))
    sampled = frames[::interval]
    if sampled.shape[0] < 2:
        raise ValueError(
            f"Clip of {frames.shape[0]} frames at {fps} fps keeps {sampled.shape[0]} frame after sampling "
            f"every {interval}th frame; dynamic_degree needs at least 2."
        )

    _, height, width, _ = sampled.shape
    threshold = max(1.0, DYNAMIC_SAMPLE_FPS / fps) * DYNAMIC_THRESHOLD_PX_AT_256 * min(height, width) / 256.0
    required = max(1, round(4 * sampled.shape[0] / 16.0))
    pair_scores = top_flow_magnitudes(sampled)
    moving = sum(score > threshold for score in pair_scores)
    logger.debug(
        "dynamic_degree: %d of %d pairs above %.3f px, %d required", moving, len(pair_scores), threshold, required
    )
    return 1.0 if moving >= required else 0.0


register("dynamic_degree", group="quality", needs={"frames"})(dynamic_degree)
