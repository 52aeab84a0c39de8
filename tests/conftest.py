"""Shared fixtures: a throwaway copy of the project with reduced params, run by the real CLIs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pgdpo.testing import COPIED, ROOT, SMALL_PARAMS, make_project, project_env, run_cli  # noqa: F401 (used by tests)


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
