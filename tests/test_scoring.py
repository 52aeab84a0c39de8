"""Tests for pgdpo.scoring: registry, totals, temporal scorers and shapes-world oracles."""

from __future__ import annotations

import importlib
import sys
import types

import cv2
import numpy as np
import pytest

from pgdpo.scoring import registry
from pgdpo.scoring.registry import (
    CONSTANT_DIMENSION_VALUE,
    FunctionScorer,
    available_scorers,
    get_scorer,
    omni_total,
    register,
    weighted_total,
)
from pgdpo.scoring.temporal import (
    dynamic_degree,
    mean_flow_magnitude,
    motion_smoothness,
    temporal_flickering,
    top_flow_magnitudes,
)

BUILT_IN = {
    "temporal_flickering": ("quality", {"frames"}),
    "motion_smoothness": ("quality", {"frames"}),
    "dynamic_degree": ("quality", {"frames"}),
    "oracle_color": ("semantic", {"frames", "prompt"}),
    "oracle_shape": ("semantic", {"frames", "prompt"}),
    "oracle_direction": ("semantic", {"frames", "prompt"}),
    "oracle_alignment": ("semantic", {"frames", "prompt"}),
}


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Blurred RGB noise stretched to 0..255, which gives optical flow texture everywhere."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 2.0)
    stretched = (blurred - blurred.min()) / (blurred.max() - blurred.min()) * 255.0
    return stretched.astype(np.uint8)


def translating_clip(shift: int, num_frames: int = 16, size: int = 64) -> np.ndarray:
    """Crop a wide texture so its content moves right by `shift` px per frame."""
    wide = texture(size, size + shift * num_frames)
    offsets = [shift * (num_frames - t) for t in range(num_frames)]
    return np.stack([wide[:, offset : offset + size] for offset in offsets])


def uniform_clip(levels: list[int], size: int = 8) -> np.ndarray:
    """Frames of one grey level each."""
    return np.stack([np.full((size, size, 3), level, dtype=np.uint8) for level in levels])


@pytest.fixture
def isolated_registry(monkeypatch):
    """Let a test register scorers without leaking them into other tests."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


# Registry


def test_built_in_scorers_registered():
    assert set(BUILT_IN) <= set(available_scorers())
    assert available_scorers() == sorted(available_scorers())
    for name, (group, needs) in BUILT_IN.items():
        scorer = get_scorer(name)
        assert scorer.name == name
        assert scorer.group == group
        assert scorer.needs == frozenset(needs)


def test_unknown_scorer_lists_known():
    with pytest.raises(ValueError, match="Unknown scorer 'imaging_quality'") as info:
        get_scorer("imaging_quality")

    for name in BUILT_IN:
        assert name in str(info.value)


def test_registered_scorer_matches_function():
    clip = translating_clip(2, num_frames=6)

    assert get_scorer("temporal_flickering")(clip, "any prompt") == temporal_flickering(clip)
    assert get_scorer("motion_smoothness")(clip, "any prompt") == motion_smoothness(clip)


def test_register_custom_scorer(isolated_registry):
    @register("mean_red", group="quality", needs=["frames"])
    def mean_red(frames):
        return frames[..., 0].mean() / 255.0

    @register("prompt_length", group="semantic", needs=["frames", "prompt"])
    def prompt_length(frames, prompt):
        return len(prompt)

    clip = uniform_clip([51, 51])
    assert mean_red(clip) == pytest.approx(0.2)
    assert get_scorer("mean_red")(clip, "ignored") == pytest.approx(0.2)
    assert get_scorer("prompt_length")(clip, "four") == 4.0
    assert isinstance(get_scorer("mean_red"), FunctionScorer)


def test_register_duplicate_name_rejected(isolated_registry):
    with pytest.raises(ValueError, match="'temporal_flickering' is already registered"):

        @register("temporal_flickering", group="quality", needs=["frames"])
        def other(frames):
            return 0.0


@pytest.mark.parametrize(
    ("group", "needs", "message"),
    [
        ("style", ["frames"], "Invalid group 'style'"),
        ("quality", ["frames", "audio"], "Invalid needs"),
        ("quality", ["prompt"], "Invalid needs"),
    ],
)
def test_register_invalid_fields(isolated_registry, group, needs, message):
    with pytest.raises(ValueError, match=message):
        register("bad", group=group, needs=needs)


def test_scorer_rejects_invalid_frames():
    scorer = get_scorer("temporal_flickering")

    with pytest.raises(ValueError, match="dtype float32"):
        scorer(np.zeros((2, 4, 4, 3), dtype=np.float32), "")
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4\)"):
        scorer(np.zeros((2, 4, 4), dtype=np.uint8), "")


def test_scorer_rejects_non_finite_result(isolated_registry):
    @register("not_a_number", group="quality", needs=["frames"])
    def not_a_number(frames):
        return float("nan")

    with pytest.raises(ValueError, match="'not_a_number' returned nan"):
        get_scorer("not_a_number")(uniform_clip([0]), "prompt")


# Totals


def test_weighted_total_hand_computed():
    scores = {"a": 0.8, "b": 0.4, "unused": 100.0}

    assert weighted_total(scores, {"a": 3.0, "b": 1.0}) == pytest.approx(0.7)
    assert weighted_total(scores, {"a": 0.75, "b": 0.25}) == pytest.approx(0.7)
    assert weighted_total(scores, {"a": 1.0, "b": 0.0}) == pytest.approx(0.8)


def test_weighted_total_missing_score():
    with pytest.raises(ValueError, match="Missing score for dimension 'b'"):
        weighted_total({"a": 0.5}, {"a": 1.0, "b": 1.0})


@pytest.mark.parametrize(
    ("scores", "weights", "message"),
    [
        ({"a": 0.5}, {"a": -1.0}, "Invalid weight -1.0 for 'a'"),
        ({"a": 0.5}, {"a": 0.0}, "sum to more than 0"),
        ({"a": 0.5}, {}, "sum to more than 0"),
        ({"a": float("nan")}, {"a": 1.0}, "Invalid score nan for dimension 'a'"),
    ],
)
def test_weighted_total_invalid(scores, weights, message):
    with pytest.raises(ValueError, match=message):
        weighted_total(scores, weights)


OMNI_TABLE = [
    {"temporal_flickering": 0.90, "motion_smoothness": 0.80, "oracle_alignment": 1.0},
    {"temporal_flickering": 0.95, "motion_smoothness": 0.60, "oracle_alignment": 0.0},
    {"temporal_flickering": 1.00, "motion_smoothness": 0.70, "oracle_alignment": 1.0},
]


def test_omni_total_hand_computed():
    # Normalised flickering 0, 0.5, 1 and smoothness 1, 0, 0.5 give quality means
    # 0.5, 0.25, 0.75. Alignment gives semantic 1, 0, 1. Totals are (4Q + S) / 5.
    totals = omni_total(OMNI_TABLE)

    assert totals == pytest.approx([0.6, 0.2, 0.8])


def test_omni_total_custom_weights():
    # With 1:1 weights the totals are (Q + S) / 2.
    assert omni_total(OMNI_TABLE, quality_weight=1.0, semantic_weight=1.0) == pytest.approx([0.75, 0.125, 0.875])
    assert omni_total(OMNI_TABLE, semantic_weight=0.0) == pytest.approx([0.5, 0.25, 0.75])


def test_omni_total_constant_dimension():
    table = [dict(row, dynamic_degree=1.0) for row in OMNI_TABLE]

    totals = omni_total(table)

    # Quality means become (0 + 1 + c) / 3, (0.5 + 0 + c) / 3 and (1 + 0.5 + c) / 3.
    c = CONSTANT_DIMENSION_VALUE
    quality = [(1 + c) / 3, (0.5 + c) / 3, (1.5 + c) / 3]
    semantic = [1.0, 0.0, 1.0]
    assert totals == pytest.approx([(4 * q + s) / 5 for q, s in zip(quality, semantic)])


def test_omni_total_dimension_weights():
    # Flickering weight 0.5: quality means (0.5 * 0 + 1) / 1.5, (0.5 * 0.5 + 0) / 1.5
    # and (0.5 * 1 + 0.5) / 1.5, that is 2/3, 1/6 and 2/3.
    totals = omni_total(OMNI_TABLE, dimension_weights={"temporal_flickering": 0.5})

    quality = [2 / 3, 1 / 6, 2 / 3]
    semantic = [1.0, 0.0, 1.0]
    assert totals == pytest.approx([(4 * q + s) / 5 for q, s in zip(quality, semantic)])


def test_omni_total_fixed_bounds():
    # Flickering on fixed bounds (0.8, 1.0) normalises to 0.5, 0.75 and 1.0, so the
    # quality means are 0.75, 0.375 and 0.75.
    totals = omni_total(OMNI_TABLE, bounds={"temporal_flickering": (0.8, 1.0)})

    quality = [0.75, 0.375, 0.75]
    semantic = [1.0, 0.0, 1.0]
    assert totals == pytest.approx([(4 * q + s) / 5 for q, s in zip(quality, semantic)])
    with pytest.raises(ValueError, match="Invalid bounds"):
        omni_total(OMNI_TABLE, bounds={"temporal_flickering": (1.0, 1.0)})


def test_omni_total_single_row():
    assert omni_total([OMNI_TABLE[0]]) == pytest.approx([CONSTANT_DIMENSION_VALUE])


def test_omni_total_custom_groups():
    table = [{"sharpness": 0.1, "clip_score": 0.3}, {"sharpness": 0.3, "clip_score": 0.2}]

    totals = omni_total(table, groups={"sharpness": "quality", "clip_score": "semantic"})

    assert totals == pytest.approx([(4 * 0.0 + 1.0) / 5, (4 * 1.0 + 0.0) / 5])


def test_omni_total_missing_group():
    table = [{"temporal_flickering": 0.9}, {"temporal_flickering": 1.0}]

    with pytest.raises(ValueError, match="no semantic dimensions.*semantic_weight=0"):
        omni_total(table)
    assert omni_total(table, semantic_weight=0.0) == pytest.approx([0.0, 1.0])


def test_omni_total_rows_differ():
    table = [OMNI_TABLE[0], {"temporal_flickering": 0.9}]

    with pytest.raises(ValueError, match="Row 1 has dimensions"):
        omni_total(table)


def test_omni_total_unknown_dimension():
    with pytest.raises(ValueError, match="Unknown dimension 'sharpness'.*groups="):
        omni_total([{"sharpness": 0.5, "oracle_alignment": 1.0}])


def test_omni_total_empty_table():
    with pytest.raises(ValueError, match="no rows"):
        omni_total([])


# Temporal scorers


def test_flickering_static_clip_is_one():
    static = np.repeat(texture(32, 32)[None], 8, axis=0)

    assert temporal_flickering(static) == 1.0


def test_flickering_hand_computed():
    # Grey levels 100, 130, 100, 130 differ by 30 in every pixel and channel.
    assert temporal_flickering(uniform_clip([100, 130, 100, 130])) == pytest.approx(225 / 255)
    # Differences of 10 and 30 average to 20.
    assert temporal_flickering(uniform_clip([0, 10, 40])) == pytest.approx(235 / 255)
    # Full black-white alternation is the worst case.
    assert temporal_flickering(uniform_clip([0, 255, 0])) == pytest.approx(0.0)


def test_flickering_needs_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        temporal_flickering(uniform_clip([0]))


@pytest.mark.parametrize("shift", [1, 3, 5])
def test_flow_magnitude_matches_shift(shift):
    # Measured: 0.999, 3.000 and 5.008 px.
    assert mean_flow_magnitude(translating_clip(shift, num_frames=6)) == pytest.approx(shift, rel=0.05)


def test_flow_magnitude_static_is_zero():
    static = np.repeat(texture(64, 64)[None], 4, axis=0)

    assert mean_flow_magnitude(static) < 0.05


def test_top_flow_magnitudes_per_pair():
    scores = top_flow_magnitudes(translating_clip(3, num_frames=5))

    assert len(scores) == 4
    assert scores == pytest.approx([3.0] * 4, rel=0.1)


def test_smoothness_linear_motion_near_one():
    # Measured: 0.9993 at 1 px and 0.9982 at 2 px per frame.
    assert motion_smoothness(translating_clip(1)) > 0.995
    assert motion_smoothness(translating_clip(2)) > 0.99
    assert motion_smoothness(np.repeat(texture(64, 64)[None], 5, axis=0)) == 1.0


def test_smoothness_random_frames_lower():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)

    random_score = motion_smoothness(noise)

    # Measured: 0.729.
    assert random_score < 0.8
    assert random_score < motion_smoothness(translating_clip(2)) - 0.15


def test_smoothness_needs_three_frames():
    with pytest.raises(ValueError, match="at least 3 frames"):
        motion_smoothness(translating_clip(1, num_frames=2))


def test_dynamic_degree_static_and_moving():
    static = np.repeat(texture(64, 64)[None], 16, axis=0)

    assert dynamic_degree(static) == 0.0
    # Threshold on a 64 px side is 6 * 64 / 256 = 1.5 px.
    assert dynamic_degree(translating_clip(1)) == 0.0
    assert dynamic_degree(translating_clip(3)) == 1.0


def test_dynamic_degree_counts_moving_pairs():
    # 16 frames need round(4 * 16 / 16) = 4 pairs above 1.5 px. The clip moves
    # 3 px per frame for 3 pairs and is static otherwise, so it is not dynamic.
    moving = translating_clip(3, num_frames=4)
    still = np.repeat(moving[-1:], 12, axis=0)
    assert dynamic_degree(np.concatenate([moving, still])) == 0.0

    moving = translating_clip(3, num_frames=5)
    still = np.repeat(moving[-1:], 11, axis=0)
    assert dynamic_degree(np.concatenate([moving, still])) == 1.0


def test_dynamic_degree_fps_sampling():
    # At 16 fps every second frame is kept, so 1 px per frame becomes 2 px per kept
    # pair, above the 1.5 px threshold of a 64 px side.
    slow = translating_clip(1, num_frames=16)
    assert dynamic_degree(slow, fps=8.0) == 0.0
    assert dynamic_degree(slow, fps=16.0) == 1.0

    # At 4 fps every frame is kept and the threshold doubles to 3 px.
    medium = translating_clip(2, num_frames=16)
    assert dynamic_degree(medium, fps=8.0) == 1.0
    assert dynamic_degree(medium, fps=4.0) == 0.0

    with pytest.raises(ValueError, match="Invalid fps 0"):
        dynamic_degree(medium, fps=0)


# Oracle scorers, wired to a stand-in for pgdpo.world


@pytest.fixture
def stub_world(monkeypatch):
    """Replace pgdpo.world with a stub whose alignment result is fixed."""
    stub = types.ModuleType("pgdpo.world")
    stub.calls = []

    def parse_prompt(prompt):
        if not prompt.startswith("a "):
            raise ValueError(f"Invalid prompt {prompt!r}")
        return prompt

    def detect(frames):
        return frames.shape

    def alignment(detection, attrs):
        stub.calls.append((detection, attrs))
        return {"color": 1.0, "shape": 0.0, "direction": 1.0, "overall": 0.0}

    stub.parse_prompt = parse_prompt
    stub.detect = detect
    stub.alignment = alignment
    monkeypatch.setitem(sys.modules, "pgdpo.world", stub)
    return stub


def test_oracle_scorers_select_keys(stub_world):
    clip = uniform_clip([0, 0])
    expected = {"oracle_color": 1.0, "oracle_shape": 0.0, "oracle_direction": 1.0, "oracle_alignment": 0.0}

    for name, value in expected.items():
        assert get_scorer(name)(clip, "a stub prompt") == value
    assert stub_world.calls[0] == (clip.shape, "a stub prompt")


def test_oracle_rejects_foreign_prompt(stub_world):
    with pytest.raises(ValueError, match="not in the shapes-world grammar") as info:
        get_scorer("oracle_color")(uniform_clip([0, 0]), "the Eiffel Tower at night")

    assert "'the Eiffel Tower at night'" in str(info.value)
    assert "oracle scorers only apply to shapes-world prompts" in str(info.value)


# Oracle scorers against the real pgdpo.world


def load_world():
    """Return (pgdpo.world, render_clip), or skip when the world package is not available yet."""
    try:
        world = importlib.import_module("pgdpo.world")
        render = importlib.import_module("pgdpo.world.render")
    except ImportError as error:
        pytest.skip(f"pgdpo.world is not importable yet ({error}); rerun when it lands")
    missing = [name for name in ("parse_prompt", "detect", "alignment") if not hasattr(world, name)]
    if missing or not hasattr(render, "render_clip"):
        pytest.skip(f"pgdpo.world does not export {missing or ['render.render_clip']} yet; rerun when it lands")
    return world, render.render_clip


def test_oracle_real_world_matching_prompt():
    world, render_clip = load_world()
    prompt = "a red circle moving right"
    clip = render_clip(world.parse_prompt(prompt), np.random.default_rng(0))

    for name in ("oracle_color", "oracle_shape", "oracle_direction", "oracle_alignment"):
        assert get_scorer(name)(clip, prompt) == 1.0, name


def test_oracle_real_world_mismatch():
    world, render_clip = load_world()
    clip = render_clip(world.parse_prompt("a red circle moving right"), np.random.default_rng(0))

    wrong_color = "a blue circle moving right"
    assert get_scorer("oracle_color")(clip, wrong_color) == 0.0
    assert get_scorer("oracle_shape")(clip, wrong_color) == 1.0
    assert get_scorer("oracle_direction")(clip, wrong_color) == 1.0

    wrong_direction = "a red circle moving left"
    assert get_scorer("oracle_color")(clip, wrong_direction) == 1.0
    assert get_scorer("oracle_direction")(clip, wrong_direction) == 0.0

    # oracle_alignment passes on the world's own "overall" value, whatever its definition.
    for prompt in (wrong_color, wrong_direction, "a blue square moving left"):
        expected = world.alignment(world.detect(clip), world.parse_prompt(prompt))["overall"]
        assert get_scorer("oracle_alignment")(clip, prompt) == expected
        assert expected < 1.0


def test_oracle_real_world_foreign_prompt():
    load_world()

    with pytest.raises(ValueError, match="only apply to shapes-world prompts"):
        get_scorer("oracle_alignment")(uniform_clip([0, 0]), "a cat playing piano")
