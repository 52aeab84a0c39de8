"""Benchmark models and data: random-weight Wan pipelines and rendered shapes-world clip pairs.

Timing does not depend on trained weights, so the models are built from the same builders the
`base` stage and the tests use, with random weights, and nothing is read from `data/`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pgdpo.models.adapter import VideoSpec
from pgdpo.models.families.wan import WanAdapter
from pgdpo.models.shapes_base import world_vocabulary
from pgdpo.models.tiny_families import TINY_FAMILIES
from pgdpo.models.tiny_wan import TinyWanConfig, build_pipeline
from pgdpo.world import all_attributes, format_prompt, parse_prompt, render_batch


@dataclass(frozen=True)
class BenchModel:
    """A named pipeline builder and the video size it is benchmarked at."""

    name: str
    description: str
    build: Callable[[int], object]
    spec: VideoSpec


def _build_shapes_base(seed: int):
    return build_pipeline(TinyWanConfig(vocabulary=world_vocabulary()), seed=seed)


def _shapes_spec() -> VideoSpec:
    config = TinyWanConfig()
    return VideoSpec(num_frames=5, height=32, width=32, fps=8, max_sequence_length=config.max_sequence_length)


_TINY_WAN = TINY_FAMILIES["wan"]

MODELS: dict[str, BenchModel] = {
    "shapes_base": BenchModel(
        "shapes_base",
        "shapes-world base architecture (tiny_wan.TinyWanConfig defaults, 4 layers), 5x32x32 clips",
        _build_shapes_base,
        _shapes_spec(),
    ),
    "tiny_wan": BenchModel(
        "tiny_wan",
        "tiny Wan family of tiny_families.TINY_FAMILIES['wan'] (1 layer), 9x32x32 clips",
        _TINY_WAN.build,
        VideoSpec(fps=8, **_TINY_WAN.video),
    ),
}


def load_model(name: str, device: torch.device, seed: int = 0) -> WanAdapter:
    """Build benchmark model `name` with random weights on `device` and wrap it in its adapter."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; expected one of {sorted(MODELS)}")
    model = MODELS[name]
    pipe = model.build(seed)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return WanAdapter(pipe, model.spec, device, torch.float32)


@dataclass
class ClipPairs:
    """Pixel clips of N preference pairs, as the public Diffusion-DPO scripts read them every step."""

    prompts: list[str]
    chosen: np.ndarray  # (N, F, H, W, 3) uint8
    rejected: np.ndarray  # (N, F, H, W, 3) uint8
    score_w: torch.Tensor  # (N,) in [0, 1]
    score_l: torch.Tensor  # (N,) in [0, 1], below score_w


def shapes_prompts(count: int) -> list[str]:
    """Return `count` shapes-world prompts: the grammar's 60 prompts in a fixed shuffled order, repeated
    if `count` exceeds 60. The shuffle spreads short lists over many (colour, shape) pairs."""
    grammar = [format_prompt(attrs) for attrs in all_attributes()]
    order = np.random.default_rng(0).permutation(len(grammar))
    return [grammar[order[i % len(grammar)]] for i in range(count)]


def render_pairs(count: int, spec: VideoSpec, seed: int) -> ClipPairs:
    """Render `count` pairs of clips of the shapes world and draw scores with chosen > rejected."""
    prompts = shapes_prompts(count)
    attrs = [parse_prompt(prompt) for prompt in prompts]
    size = {"num_frames": spec.num_frames, "height": spec.height, "width": spec.width}
    rng = np.random.default_rng(seed)
    high = rng.uniform(0.3, 1.0, size=count)
    low = high * rng.uniform(0.0, 0.9, size=count)
    return ClipPairs(
        prompts=prompts,
        chosen=render_batch(attrs, seed=seed, **size),
        rejected=render_batch(attrs, seed=seed + 1, **size),
        score_w=torch.tensor(high, dtype=torch.float32),
        score_l=torch.tensor(low, dtype=torch.float32),
    )
