"""Shared fixtures: a throwaway copy of the project with reduced params, run by the real CLIs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pgdpo.testing import COPIED, ROOT, SMALL_PARAMS, make_project, project_env, run_cli  # noqa: F401 (used by tests)


def add_nonzero_lora(adapter, scale: float) -> None:
    """Add a seeded rank-4 LoRA to `adapter` and fill its B matrices with `scale` times normal noise.

    add_lora starts B at zero, so the adapter changes nothing and A gets no gradient. Nonzero B
    matrices make every LoRA weight matter.
    """
    import torch

    from pgdpo.training.lora import add_lora

    add_lora(adapter, rank=4, alpha=4.0, dropout=0.0, targets=None, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapter.denoiser.named_parameters():
            if "lora_B" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


@pytest.fixture(scope="session")
def tiny_wan_folder(tmp_path_factory) -> Path:
    """A random-weight `WanPipeline` saved with `save_pretrained`, with no pgdpo.json: its video
    size must come from `base.video` (9 frames of 32x32 pixels, see `TINY_WAN_VIDEO`)."""
    from pgdpo.models.tiny_families import build_wan

    folder = tmp_path_factory.mktemp("tiny-wan") / "pipeline"
    build_wan(seed=0).save_pretrained(folder)
    return folder


# base.video of `tiny_wan_folder`: its VAE compresses time by 2 and space by 2.
TINY_WAN_VIDEO = {"num_frames": 9, "height": 32, "width": 32, "fps": 8, "max_sequence_length": 16}


@pytest.fixture(scope="session")
def reproduced_project(tmp_path_factory) -> Path:
    """A project copy on which `dvc repro` has run the whole pipeline once."""
    project = make_project(tmp_path_factory.mktemp("project"))
    run_cli([sys.executable, "-m", "dvc", "repro"], project)
    return project
