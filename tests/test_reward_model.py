"""Tests for the tiny shapes-world CLIP: it trains, beats chance, saves in open_clip's layout and reloads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pgdpo.reward.train import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    RewardModelConfig,
    group_by_combo,
    sample_batch,
    train_reward_model,
)
from pgdpo.scoring import get_scorer
from pgdpo.scoring.clip import load_clip
from pgdpo.world import Attributes, render_batch, split_prompts

SMALL = RewardModelConfig(steps=80, clips_per_prompt=2, eval_clips_per_prompt=2, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    train_prompts, eval_prompts = split_prompts(3, seed=0)
    folder = tmp_path_factory.mktemp("reward-model")
    metrics = train_reward_model(train_prompts, eval_prompts, SMALL, folder)
    return folder, metrics


def test_retrieval_beats_chance(trained):
    _, metrics = trained
    assert metrics["train_top1"] > 2 * metrics["train_chance"]
    assert metrics["held_out_top1"] > metrics["held_out_chance"]
    assert metrics["all_prompts_top1"] > metrics["all_prompts_chance"]
    assert metrics["held_out_chance"] == pytest.approx(1 / 3)
    assert metrics["all_prompts_chance"] == pytest.approx(1 / 15)


def test_saved_in_open_clip_layout(trained):
    folder, _ = trained
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["model_cfg"]["vision_cfg"]["image_size"] == 32
    assert config["preprocess_cfg"]["size"] == [32, 32]
    assert (folder / WEIGHTS_FILE).stat().st_size > 0


def test_reloaded_model_scores_matching_prompt_higher(trained):
    folder, _ = trained
    clip = load_clip({"model": f"local-dir:{folder}"})
    frames = render_batch([Attributes("red", "circle", "left")], seed=5, num_frames=5)[0]
    scorer = get_scorer("clip_score")
    matching = scorer(frames, "a red circle moving left", clip=clip)
    other_colour = scorer(frames, "a blue circle moving left", clip=clip)
    assert matching > other_colour


def test_batch_has_one_prompt_per_combo():
    train_prompts, _ = split_prompts(3, seed=0)
    combos = group_by_combo(train_prompts)
    batch = sample_batch(combos, num_clips=2, num_frames=5, batch_size=100, rng=np.random.default_rng(0))
    assert len(batch) == len(combos) == 12
    drawn = [group for group, ids in combos.items() for prompt, _, _ in batch if prompt in ids]
    assert len(set(drawn)) == len(batch)


def test_same_seed_same_weights(tmp_path):
    train_prompts, eval_prompts = split_prompts(3, seed=0)
    config = RewardModelConfig(steps=3, clips_per_prompt=1, eval_clips_per_prompt=1)
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        train_reward_model(train_prompts, eval_prompts, config, tmp_path / name)
    first = (tmp_path / "first" / WEIGHTS_FILE).read_bytes()
    assert first == (tmp_path / "second" / WEIGHTS_FILE).read_bytes()
    assert (tmp_path / "first" / CONFIG_FILE).read_text() == (tmp_path / "second" / CONFIG_FILE).read_text()


def test_single_combo_rejected(tmp_path):
    prompts = ["a red circle moving left", "a red circle moving up"]
    with pytest.raises(ValueError, match="at least 2 \\(colour, shape\\) pairs"):
        train_reward_model(prompts, prompts, SMALL, tmp_path)


def test_logit_scale_capped(trained):
    folder, _ = trained
    from safetensors.torch import load_file

    state = load_file(str(folder / WEIGHTS_FILE))
    assert float(state["logit_scale"]) <= float(torch.log(torch.tensor(100.0))) + 1e-6
