"""Candidate generation: K seeded clips per prompt, written as VBench-named MP4s plus a manifest."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pgdpo.io import atomic_dir, write_table
from pgdpo.models.adapter import VideoModelAdapter
from pgdpo.naming import video_filename
from pgdpo.video import file_sha256, write_mp4

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["prompt_id", "prompt", "index", "seed", "path", "sha256"]


def candidate_seeds(num_prompts: int, num_candidates: int, base_seed: int) -> list[int]:
    """Return one seed per (prompt, candidate), row-major: prompt i, candidate k -> base + i*K + k."""
    return [base_seed + i * num_candidates + k for i in range(num_prompts) for k in range(num_candidates)]


def generate_videos(
    adapter: VideoModelAdapter,
    prompts: list[str],
    num_per_prompt: int,
    base_seed: int,
    out_dir: Path,
    num_inference_steps: int,
    guidance_scale: float,
    batch_size: int,
    desc: str = "generate",
) -> pd.DataFrame:
    """Sample `num_per_prompt` clips for every prompt and write them under `out_dir/videos`.

    The folder is built in a temporary sibling and renamed into place, so a killed run leaves
    the previous folder or none. Paths in the manifest are relative to `out_dir`.

    Returns:
        The manifest with columns prompt_id, prompt, index, seed, path, sha256.
    """
    if not prompts:
        raise ValueError("no prompts to generate for; the prompt list is empty")
    expanded = [prompt for prompt in prompts for _ in range(num_per_prompt)]
    seeds = candidate_seeds(len(prompts), num_per_prompt, base_seed)
    clips = adapter.generate(
        expanded, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
        batch_size=batch_size, desc=desc,
    )

    rows = []
    with atomic_dir(out_dir) as tmp:
        (tmp / "videos").mkdir()
        for n, (prompt, seed, clip) in enumerate(tqdm(list(zip(expanded, seeds, clips)), desc=f"{desc}: encode mp4")):
            prompt_id, index = divmod(n, num_per_prompt)
            relative = Path("videos") / video_filename(prompt, index)
            write_mp4(tmp / relative, clip, fps=adapter.spec.fps)
            rows.append([prompt_id, prompt, index, seed, relative.as_posix(), file_sha256(tmp / relative)])
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        write_table(manifest, tmp / "manifest.csv")
    logger.info("wrote %d videos for %d prompts to %s", len(manifest), len(prompts), out_dir)
    return manifest
