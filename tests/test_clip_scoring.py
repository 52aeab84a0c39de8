"""Tests for the open_clip scorers, on a tiny random CLIP saved to disk and loaded by open_clip's loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pgdpo.config import ScoringParams
from pgdpo.scoring import clip as clip_scoring
from pgdpo.scoring import get_scorer, load_resources, registry
from pgdpo.scoring.clip import (
    ClipWeightsError,
    consistency_from_features,
    load_aesthetic,
    load_clip,
    resource_options,
    style_phrase,
)
from pgdpo.reward.train import ARCHITECTURE, WEIGHTS_FILE, register_architecture, save_open_clip
from pgdpo.world import Attributes, render_batch

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A randomly initialised shapes-clip-tiny saved in open_clip's local-dir layout."""
    import open_clip

    register_architecture()
    torch.manual_seed(0)
    model = open_clip.create_model(ARCHITECTURE)
    folder = tmp_path_factory.mktemp("tiny-clip")
    save_open_clip(model, open_clip.get_model_config(ARCHITECTURE), folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir):
    return load_clip({"model": f"local-dir:{tiny_clip_dir}"})


@pytest.fixture(scope="module")
def moving_clip() -> np.ndarray:
    return render_batch([Attributes("red", "circle", "left")], seed=0, num_frames=5)[0]


def test_clip_scorers_registered():
    expected = {
        "clip_score": ("semantic", {"frames", "prompt", "clip"}),
        "appearance_style": ("semantic", {"frames", "prompt", "clip"}),
        "background_consistency": ("quality", {"frames", "clip"}),
        "aesthetic_quality": ("quality", {"frames", "aesthetic"}),
    }
    for name, (group, needs) in expected.items():
        scorer = get_scorer(name)
        assert scorer.group == group
        assert scorer.needs == frozenset(needs)
    assert get_scorer("clip_score").resources == frozenset({"clip"})
    assert get_scorer("temporal_flickering").resources == frozenset()


def test_image_features_unit_norm(tiny_clip, moving_clip):
    features = tiny_clip.image_features(moving_clip)
    assert features.shape == (5, 64)
    assert features.dtype == torch.float64
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(5, dtype=torch.float64))


def test_text_features_cached(tiny_clip):
    first = tiny_clip.text_features([PROMPT, "a blue square moving up", PROMPT])
    assert first.shape == (3, 64)
    torch.testing.assert_close(first[0], first[2])
    assert PROMPT in tiny_clip._text_cache
    torch.testing.assert_close(tiny_clip.text_features([PROMPT])[0], first[0])


def test_clip_score_range_and_formula(tiny_clip, moving_clip):
    score = get_scorer("clip_score")(moving_clip, PROMPT, clip=tiny_clip)
    assert isinstance(score, float)
    assert -1.0 <= score <= 1.0
    expected = (tiny_clip.image_features(moving_clip) @ tiny_clip.text_features([PROMPT])[0]).mean()
    assert score == pytest.approx(float(expected), abs=1e-12)


def test_clip_score_repeatable(tiny_clip, moving_clip):
    scorer = get_scorer("clip_score")
    assert scorer(moving_clip, PROMPT, clip=tiny_clip) == scorer(moving_clip.copy(), PROMPT, clip=tiny_clip)


def test_clip_score_identical_frames_match_one_frame(tiny_clip, moving_clip):
    scorer = get_scorer("clip_score")
    one = scorer(moving_clip[:1], PROMPT, clip=tiny_clip)
    repeated = scorer(np.repeat(moving_clip[:1], 4, axis=0), PROMPT, clip=tiny_clip)
    # Batches of different size give float32 features that differ in the 8th digit.
    assert repeated == pytest.approx(one, abs=1e-6)


def test_background_consistency_static_clip_is_one(tiny_clip, moving_clip):
    static = np.repeat(moving_clip[:1], 5, axis=0)
    assert get_scorer("background_consistency")(static, PROMPT, clip=tiny_clip) == pytest.approx(1.0, abs=1e-6)


def test_background_consistency_range(tiny_clip, moving_clip):
    noise = np.random.default_rng(0).integers(0, 256, moving_clip.shape, dtype=np.uint8)
    for frames in (moving_clip, noise):
        value = get_scorer("background_consistency")(frames, PROMPT, clip=tiny_clip)
        assert 0.0 <= value <= 1.0 + 1e-9


def test_consistency_formula_hand_computed():
    # Frame 1 is orthogonal to frames 0 and 2: its two similarities are 0.
    # Frame 2 equals frame 0 and is orthogonal to frame 1: (1 + 0) / 2 = 0.5.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert consistency_from_features(features) == pytest.approx(0.25)


def test_consistency_clamps_negative_similarity():
    features = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert consistency_from_features(features) == 0.0


def test_consistency_single_frame_is_one():
    assert consistency_from_features(torch.tensor([[0.6, 0.8]], dtype=torch.float64)) == 1.0


@pytest.mark.parametrize(
    ("prompt", "phrase"),
    [
        ("The bund Shanghai, oil painting", "oil painting"),
        ("a beach by Hokusai, in the style of Ukiyo", "in the style of Ukiyo"),
        (PROMPT, PROMPT),
        ("trailing comma, ", "trailing comma, "),
    ],
)
def test_style_phrase(prompt, phrase):
    assert style_phrase(prompt) == phrase


def test_appearance_style_uses_style_phrase(tiny_clip, moving_clip):
    styled = get_scorer("appearance_style")(moving_clip, "a red circle, oil painting", clip=tiny_clip)
    direct = get_scorer("clip_score")(moving_clip, "oil painting", clip=tiny_clip)
    assert styled == pytest.approx(direct, abs=1e-12)


def test_checkpoint_file_loads_same_weights(tiny_clip_dir, tiny_clip, moving_clip):
    from_file = load_clip({"model": ARCHITECTURE, "pretrained": str(tiny_clip_dir / WEIGHTS_FILE)})
    torch.testing.assert_close(from_file.image_features(moving_clip), tiny_clip.image_features(moving_clip))


def test_load_resources_builds_clip_once(tiny_clip_dir):
    scorers = [get_scorer("clip_score"), get_scorer("background_consistency"), get_scorer("temporal_flickering")]
    resources = load_resources(scorers, {"clip": {"model": f"local-dir:{tiny_clip_dir}"}})
    assert list(resources) == ["clip"]
    assert isinstance(resources["clip"], clip_scoring.ClipModel)


def test_scorer_without_resource_raises(moving_clip):
    with pytest.raises(ValueError, match="needs the resources \\['clip'\\]"):
        get_scorer("clip_score")(moving_clip, PROMPT)


def test_register_resource_rejects_input_name():
    with pytest.raises(ValueError, match="Invalid resource name 'frames'"):
        registry.register_resource("frames", lambda options: None)


def test_missing_local_dir_names_the_fix(tmp_path):
    with pytest.raises(ClipWeightsError, match="dvc repro reward_model") as error:
        load_clip({"model": f"local-dir:{tmp_path / 'absent'}"})
    assert "open_clip_config.json" in str(error.value)


def test_missing_checkpoint_file_names_the_path(tmp_path):
    missing = tmp_path / "weights.safetensors"
    with pytest.raises(ClipWeightsError, match="no such file exists") as error:
        load_clip({"model": "ViT-B-32", "pretrained": str(missing)})
    assert str(missing) in str(error.value)


def test_failed_download_names_weights_and_fix(monkeypatch, tmp_path):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("network unreachable (test stub)")

    # The stub replaces the download as on a machine without network, so nothing is downloaded.
    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(ClipWeightsError) as error:
        load_clip({"model": "ViT-B-32", "pretrained": "openai", "cache_dir": str(tmp_path)})
    message = str(error.value)
    assert "model='ViT-B-32' pretrained='openai'" in message
    assert "HF_HUB_OFFLINE=1" in message
    assert "scoring.clip.pretrained" in message


def test_missing_model_name_raises():
    with pytest.raises(ClipWeightsError, match="Missing scoring.clip.model"):
        load_clip({"model": ""})


def test_aesthetic_without_head_explains(tmp_path):
    with pytest.raises(ClipWeightsError, match="scoring.aesthetic.head"):
        load_aesthetic({"model": "ViT-L-14", "pretrained": "openai", "head": str(tmp_path / "absent.pth")})


def test_aesthetic_quality_formula(tiny_clip_dir, tmp_path, moving_clip):
    head = torch.nn.Linear(64, 1)
    torch.nn.init.normal_(head.weight, generator=torch.Generator().manual_seed(0))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    aesthetic = load_aesthetic({"model": f"local-dir:{tiny_clip_dir}", "head": str(tmp_path / "head.pth")})

    score = get_scorer("aesthetic_quality")(moving_clip, PROMPT, aesthetic=aesthetic)
    features = aesthetic.clip.image_features(moving_clip)
    expected = (features @ head.weight.detach().double()[0] + head.bias.detach().double()[0]).mean() / 10
    assert score == pytest.approx(float(expected), abs=1e-9)


def test_aesthetic_head_size_mismatch(tiny_clip_dir, tmp_path):
    torch.save(torch.nn.Linear(768, 1).state_dict(), tmp_path / "head.pth")
    with pytest.raises(ValueError, match="expects 768-dim features"):
        load_aesthetic({"model": f"local-dir:{tiny_clip_dir}", "head": str(tmp_path / "head.pth")})


def test_aesthetic_head_wrong_keys(tiny_clip_dir, tmp_path):
    torch.save({"layers.0.weight": torch.zeros(1, 64)}, tmp_path / "head.pth")
    with pytest.raises(ValueError, match="Invalid aesthetic head"):
        load_aesthetic({"model": f"local-dir:{tiny_clip_dir}", "head": str(tmp_path / "head.pth")})


def test_resource_options_absolute(monkeypatch, tmp_path):
    (tmp_path / "data" / "reward_model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    options = resource_options(ScoringParams())
    assert options["clip"]["model"] == f"local-dir:{(tmp_path / 'data' / 'reward_model').resolve()}"
    assert options["clip"]["pretrained"] is None
    assert options["aesthetic"]["head"] is None
    assert options["aesthetic"]["model"] == "ViT-L-14"
