"""Tests of the shapes world: prompt grammar, renderer and oracle."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from scipy import ndimage

from pgdpo.world import (
    ATTRIBUTE_NAMES,
    COLORS,
    DIRECTIONS,
    SHAPES,
    Attributes,
    Detection,
    alignment,
    all_attributes,
    detect,
    format_prompt,
    parse_prompt,
    render_batch,
    render_clip,
    split_prompts,
)

MIN_ACCURACY = 0.98

# 5 batches of all 60 combinations, each from its own seed: 300 clips.
DATASET_SEEDS = (11, 12, 13, 14, 15)


@pytest.fixture(scope="module")
def dataset() -> tuple[list[Attributes], np.ndarray]:
    attrs_list = all_attributes() * len(DATASET_SEEDS)
    clips = np.concatenate([render_batch(all_attributes(), seed=seed) for seed in DATASET_SEEDS])
    return attrs_list, clips


def _accuracy(attrs_list: list[Attributes], clips: np.ndarray) -> dict[str, float]:
    detections = [detect(clip) for clip in clips]
    return {
        name: float(np.mean([getattr(d, name) == getattr(a, name) for d, a in zip(detections, attrs_list)]))
        for name in ATTRIBUTE_NAMES
    }


def _assert_accuracy(accuracy: dict[str, float], condition: str, count: int) -> None:
    for name in ATTRIBUTE_NAMES:
        assert accuracy[name] >= MIN_ACCURACY, (
            f"{name} accuracy {accuracy[name]:.3f} on {count} {condition} clips is below "
            f"{MIN_ACCURACY} (all accuracies: {accuracy})"
        )


def _intensity_centroids(clip: np.ndarray) -> np.ndarray:
    """Return the brightness-weighted centroid (row, col) per frame, shape (F, 2)."""
    weights = clip.max(axis=-1).astype(np.float64)
    rows, cols = np.indices(weights.shape[1:], dtype=np.float64)
    totals = weights.sum(axis=(1, 2))
    return np.stack(
        [(weights * rows).sum(axis=(1, 2)) / totals, (weights * cols).sum(axis=(1, 2)) / totals],
        axis=1,
    )


def _h264_round_trip(av, clip: np.ndarray) -> np.ndarray:
    """Encode a clip with libx264 (yuv420p, crf 18, 8 fps) into an in-memory MP4 and decode it."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = clip.shape[2]
        stream.height = clip.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        # One thread gives the same bitstream and skips thread start-up per clip.
        stream.thread_count = 1
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

    buffer.seek(0)
    with av.open(buffer, mode="r") as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack(frames)


# Grammar


def test_format_prompt_example():
    assert format_prompt(Attributes("red", "circle", "left")) == "a red circle moving left"


def test_prompt_round_trip_all():
    prompts = [format_prompt(attrs) for attrs in all_attributes()]

    assert len(set(prompts)) == 60
    for attrs, prompt in zip(all_attributes(), prompts):
        assert parse_prompt(prompt) == attrs
        assert parse_prompt(f"  {prompt.upper()}\n") == attrs


def test_parse_prompt_normalizes_inner_whitespace():
    assert parse_prompt("a  Blue\tsquare moving   UP") == Attributes("blue", "square", "up")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        "a red circle",
        "a purple circle moving left",
        "a red hexagon moving left",
        "a red circle moving sideways",
        "the red circle moving left",
        "a red circle moving left fast",
        "a circle red moving left",
    ],
)
def test_parse_prompt_rejects_invalid(prompt):
    with pytest.raises(ValueError, match="Invalid prompt") as error:
        parse_prompt(prompt)

    assert repr(prompt) in str(error.value)
    assert "magenta" in str(error.value)


def test_all_attributes_fixed_order():
    attrs_list = all_attributes()

    assert len(attrs_list) == 60
    assert len(set(attrs_list)) == 60
    assert attrs_list == all_attributes()
    assert attrs_list[0] == Attributes("red", "circle", "left")
    assert attrs_list[-1] == Attributes("magenta", "triangle", "down")


def test_attributes_reject_unknown_value():
    with pytest.raises(ValueError, match="Invalid color 'purple'"):
        Attributes("purple", "circle", "left")
    with pytest.raises(ValueError, match="Invalid shape 'star'"):
        Attributes("red", "star", "left")
    with pytest.raises(ValueError, match="Invalid direction 'north'"):
        Attributes("red", "circle", "north")


def test_attributes_as_dict():
    attrs = Attributes("green", "triangle", "down")

    assert attrs.as_dict() == {"color": "green", "shape": "triangle", "direction": "down"}
    assert tuple(attrs.as_dict()) == ATTRIBUTE_NAMES


def test_palette_well_separated():
    assert len(COLORS) == 5
    for first, second in itertools.combinations(COLORS.values(), 2):
        assert max(abs(a - b) for a, b in zip(first, second)) == 255


@pytest.mark.parametrize("num_eval_combos", range(1, 11))
def test_split_prompts_holds_out_pairs(num_eval_combos):
    all_prompts = {format_prompt(attrs) for attrs in all_attributes()}

    for seed in range(5):
        train, evaluation = split_prompts(num_eval_combos, seed)

        assert train == sorted(train)
        assert evaluation == sorted(evaluation)
        assert not set(train) & set(evaluation)
        assert set(train) | set(evaluation) == all_prompts
        assert len(evaluation) == 4 * num_eval_combos

        eval_attrs = [parse_prompt(prompt) for prompt in evaluation]
        train_attrs = [parse_prompt(prompt) for prompt in train]
        held_out = {(a.color, a.shape) for a in eval_attrs}
        assert len(held_out) == num_eval_combos
        for color, shape in held_out:
            directions = {a.direction for a in eval_attrs if (a.color, a.shape) == (color, shape)}
            assert directions == set(DIRECTIONS)
        assert not held_out & {(a.color, a.shape) for a in train_attrs}

        assert {a.color for a in train_attrs} == set(COLORS)
        assert {a.shape for a in train_attrs} == set(SHAPES)


def test_split_prompts_deterministic():
    assert split_prompts(3, seed=7) == split_prompts(3, seed=7)

    splits = {tuple(split_prompts(3, seed=seed)[1]) for seed in range(10)}
    assert len(splits) > 1


@pytest.mark.parametrize("num_eval_combos", [-1, 0, 11, 15])
def test_split_prompts_rejects_out_of_range(num_eval_combos):
    with pytest.raises(ValueError, match=f"Invalid num_eval_combos {num_eval_combos}"):
        split_prompts(num_eval_combos, seed=0)


# Renderer


def test_render_clip_shape_and_dtype():
    rng = np.random.default_rng(0)

    clip = render_clip(Attributes("red", "circle", "left"), rng)
    assert clip.shape == (9, 32, 32, 3)
    assert clip.dtype == np.uint8

    clip = render_clip(Attributes("blue", "square", "up"), rng, num_frames=5, height=24, width=40)
    assert clip.shape == (5, 24, 40, 3)
    assert clip.dtype == np.uint8


def test_render_batch_shape(dataset):
    _, clips = dataset

    assert clips.shape == (300, 9, 32, 32, 3)
    assert clips.dtype == np.uint8


def test_render_batch_empty():
    clips = render_batch([], seed=0, num_frames=4)

    assert clips.shape == (0, 4, 32, 32, 3)
    assert clips.dtype == np.uint8


def test_render_uses_palette_hue(dataset):
    attrs_list, clips = dataset

    for attrs, clip in zip(attrs_list, clips):
        color = np.asarray(COLORS[attrs.color])
        pixels = clip.reshape(-1, 3)
        assert (pixels[:, color == 0] == 0).all()
        # Fully covered pixels carry exactly the palette colour.
        assert (pixels == color).all(axis=1).sum() >= 9 * 20


def test_render_background_black(dataset):
    _, clips = dataset

    brightness = clips.max(axis=-1)
    assert (brightness == 0).mean() > 0.7


def test_render_keeps_margin(dataset):
    _, clips = dataset

    assert clips[:, :, 0, :, :].max() == 0
    assert clips[:, :, -1, :, :].max() == 0
    assert clips[:, :, :, 0, :].max() == 0
    assert clips[:, :, :, -1, :].max() == 0


def test_render_keeps_margin_large_frames():
    attrs_list = all_attributes()
    clips = render_batch(attrs_list, seed=3, num_frames=16, height=48, width=64)

    assert clips.shape == (60, 16, 48, 64, 3)
    assert clips[:, :, [0, -1], :, :].max() == 0
    assert clips[:, :, :, [0, -1], :].max() == 0


def test_render_deterministic():
    attrs = Attributes("yellow", "triangle", "right")

    first = render_clip(attrs, np.random.default_rng(5))
    second = render_clip(attrs, np.random.default_rng(5))
    other = render_clip(attrs, np.random.default_rng(6))

    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_render_batch_matches_render_clip():
    attrs_list = all_attributes()[:6]

    batch = render_batch(attrs_list, seed=9)
    rng = np.random.default_rng(9)
    expected = np.stack([render_clip(attrs, rng) for attrs in attrs_list])

    assert np.array_equal(batch, expected)
    assert np.array_equal(render_batch(attrs_list, seed=9), batch)


def test_render_motion_direction(dataset):
    attrs_list, clips = dataset
    # (row, col) step per frame for each direction; "up" is towards row 0.
    steps = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}

    for attrs, clip in zip(attrs_list, clips):
        centroids = _intensity_centroids(clip)
        displacement = centroids[-1] - centroids[0]
        step = np.asarray(steps[attrs.direction])
        along = float(displacement @ step)
        across = float(abs(displacement @ step[::-1]))

        # 8 frame steps at 1 to 2 px per frame.
        assert 7.5 <= along <= 16.5, f"{attrs}: moved {along:.2f} px along {attrs.direction}"
        assert across < 0.5, f"{attrs}: drifted {across:.2f} px across {attrs.direction}"


def test_render_shape_area(dataset):
    attrs_list, clips = dataset
    # Area in px for a bounding-box side of 9 to 14 px.
    area_per_side_squared = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}

    for attrs, clip in zip(attrs_list, clips):
        channel = int(np.argmax(COLORS[attrs.color]))
        areas = clip[..., channel].sum(axis=(1, 2)) / 255.0
        factor = area_per_side_squared[attrs.shape]

        # Supersampling places an edge to 1/4 px, so a moving edge of up to 14 px
        # can gain or lose up to 14 * 0.25 = 3.5 px of area.
        spread = areas.max() - areas.min()
        assert spread <= 3.6, f"{attrs}: area changes by {spread:.2f} px over frames"
        assert factor * 81 - 1 <= areas.mean() <= factor * 196 + 1, f"{attrs}: area {areas.mean():.1f}"


@pytest.mark.parametrize(
    ("num_frames", "height", "width", "message"),
    [
        (1, 32, 32, "Invalid num_frames 1"),
        (9, 8, 32, "Invalid frame size 8x32"),
        (40, 32, 32, "leave no room"),
    ],
)
def test_render_rejects_bad_clip_size(num_frames, height, width, message):
    rng = np.random.default_rng(0)

    with pytest.raises(ValueError, match=message):
        render_clip(Attributes("red", "circle", "left"), rng, num_frames=num_frames, height=height, width=width)


# Oracle


def test_detect_accuracy_clean(dataset):
    attrs_list, clips = dataset

    _assert_accuracy(_accuracy(attrs_list, clips), "clean", len(clips))


def test_detect_accuracy_noise_and_blur(dataset):
    attrs_list, clips = dataset
    rng = np.random.default_rng(0)

    noisy = clips.astype(np.float64) + rng.normal(0.0, 8.0, size=clips.shape)
    blurred = ndimage.uniform_filter(noisy, size=(1, 1, 3, 3, 1), mode="nearest")
    degraded = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)

    _assert_accuracy(_accuracy(attrs_list, degraded), "noisy (sigma 8) and 3x3-blurred", len(clips))


def test_detect_accuracy_h264(dataset):
    av = pytest.importorskip("av")
    attrs_list, clips = dataset

    decoded = np.stack([_h264_round_trip(av, clip) for clip in clips])

    assert decoded.shape == clips.shape
    assert not np.array_equal(decoded, clips)
    _assert_accuracy(_accuracy(attrs_list, decoded), "H.264 (crf 18, yuv420p)", len(clips))


def test_detect_black_clip():
    detection = detect(np.zeros((9, 32, 32, 3), dtype=np.uint8))

    assert detection.color is None
    assert detection.shape is None
    assert detection.direction is None
    assert detection.foreground_fraction == 0.0


def test_detect_dim_noise_only():
    rng = np.random.default_rng(1)
    noise = np.clip(rng.normal(0.0, 8.0, size=(9, 32, 32, 3)), 0, 255).astype(np.uint8)

    detection = detect(noise)

    assert detection == Detection(color=None, shape=None, direction=None, foreground_fraction=0.0)


def test_detect_static_shape_has_no_direction():
    clip = render_clip(Attributes("green", "square", "right"), np.random.default_rng(2))
    static = np.repeat(clip[:1], 9, axis=0)

    detection = detect(static)

    assert detection.color == "green"
    assert detection.shape == "square"
    assert detection.direction is None


def test_detect_ignores_small_speck():
    attrs = Attributes("red", "circle", "down")
    clip = render_clip(attrs, np.random.default_rng(3))
    clip[:, 0:2, 0:2] = COLORS["green"]

    detection = detect(clip)

    assert alignment(detection, attrs)["overall"] == 1.0


def test_detect_foreground_fraction(dataset):
    attrs_list, clips = dataset

    for attrs, clip in list(zip(attrs_list, clips))[:60]:
        fraction = detect(clip).foreground_fraction
        # Shapes cover 40 to 196 px of a 1024 px frame.
        assert 0.03 <= fraction <= 0.2, f"{attrs}: foreground fraction {fraction:.3f}"


def test_detect_rejects_bad_input():
    with pytest.raises(TypeError, match="Invalid clip dtype float32"):
        detect(np.zeros((9, 32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"Invalid clip shape \(9, 32, 32\)"):
        detect(np.zeros((9, 32, 32), dtype=np.uint8))


def test_alignment_scores():
    attrs = Attributes("blue", "triangle", "up")

    perfect = alignment(Detection("blue", "triangle", "up", 0.1), attrs)
    assert perfect == {"color": 1.0, "shape": 1.0, "direction": 1.0, "overall": 1.0}

    one_wrong = alignment(Detection("blue", "circle", "up", 0.1), attrs)
    assert one_wrong["shape"] == 0.0
    assert one_wrong["overall"] == pytest.approx(2 / 3)

    undecided = alignment(Detection(None, None, None, 0.0), attrs)
    assert undecided == {"color": 0.0, "shape": 0.0, "direction": 0.0, "overall": 0.0}


def test_oracle_accuracy_on_five_frame_clips():
    # The default pipeline renders 5-frame clips; the motion over 4 steps must still be read.
    attributes = all_attributes() * 5
    clips = render_batch(attributes, seed=11, num_frames=5)
    results = [alignment(detect(clip), attrs) for clip, attrs in zip(clips, attributes)]
    for name in ("color", "shape", "direction"):
        accuracy = float(np.mean([result[name] for result in results]))
        assert accuracy >= 0.98, f"{name} accuracy {accuracy:.3f} on 5-frame clips"
