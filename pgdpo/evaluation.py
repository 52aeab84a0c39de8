"""Evaluation: the base and the trained adapter sample the eval prompts from identical seeds,
and every clip is scored with the oracle, temporal flickering and the training reward."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pgdpo.scoring.table import REPORTED_DIMENSIONS, TOTAL, score_manifest
from pgdpo.video import read_video

logger = logging.getLogger(__name__)



def bootstrap_interval(values: np.ndarray, seed: int, resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Return the percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def score_model_videos(manifest: pd.DataFrame, root: Path, reward_weights: dict[str, float]) -> pd.DataFrame:
    """Score one model's eval clips on every reported dimension plus the reward total."""
    extra = [name for name in REPORTED_DIMENSIONS if name not in reward_weights]
    return score_manifest(manifest, root, reward_weights, extra_scorers=extra)


def summarise(tables: dict[str, pd.DataFrame], seed: int) -> dict:
    """Per model and dimension: mean and 95% bootstrap interval; for non-base models also the
    difference to the base with the bootstrap interval of the paired per-clip differences."""
    summary: dict = {}
    base = tables["base"]
    for model, table in tables.items():
        block = {}
        for dimension in (*REPORTED_DIMENSIONS, TOTAL):
            values = table[dimension].to_numpy()
            low, high = bootstrap_interval(values, seed)
            entry = {"mean": float(values.mean()), "ci_low": low, "ci_high": high}
            if model != "base":
                # Both models used the same prompts and seeds, so clips pair up row by row.
                delta = values - base[dimension].to_numpy()
                d_low, d_high = bootstrap_interval(delta, seed)
                entry |= {"delta": float(delta.mean()), "delta_ci_low": d_low, "delta_ci_high": d_high}
            block[dimension] = entry
        summary[model] = block
    return summary


def contact_sheet(manifests: dict[str, pd.DataFrame], roots: dict[str, Path], num_prompts: int, out_file: Path) -> None:
    """Draw a PNG: one row per prompt, the first clip of each model as a strip of frames."""
    scale, gap, label_height = 3, 6, 14
    first = next(iter(manifests.values()))
    prompts = list(dict.fromkeys(first["prompt"]))[:num_prompts]
    strips: list[list[np.ndarray]] = []
    for prompt in prompts:
        row = []
        for model, manifest in manifests.items():
            path = manifest[(manifest["prompt"] == prompt) & (manifest["index"] == 0)]["path"].iloc[0]
            frames = read_video(roots[model] / path)
            row.append(np.concatenate(list(frames), axis=1))  # frames side by side: (H, F*W, 3)
        strips.append(row)

    strip_h, strip_w = strips[0][0].shape[:2]
    width = len(manifests) * (strip_w * scale + gap)
    height = label_height + len(prompts) * (strip_h * scale + label_height)
    sheet = Image.new("RGB", (width, height), (40, 40, 40))
    draw = ImageDraw.Draw(sheet)
    for column, model in enumerate(manifests):
        draw.text((column * (strip_w * scale + gap) + 2, 1), model, fill=(255, 255, 255))
    for row_index, (prompt, row) in enumerate(zip(prompts, strips)):
        top = label_height + row_index * (strip_h * scale + label_height)
        draw.text((2, top + 1), prompt[:120], fill=(200, 200, 200))
        for column, strip in enumerate(row):
            image = Image.fromarray(strip).resize((strip_w * scale, strip_h * scale), Image.NEAREST)
            sheet.paste(image, (column * (strip_w * scale + gap), top + label_height))
    out_file.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_file)


def markdown_table(summary: dict) -> str:
    """Render the summary as a markdown table: rows are dimensions, columns models and deltas."""
    models = list(summary)
    header = "| dimension | " + " | ".join(models) + " | " + " | ".join(f"{m} - base" for m in models[1:]) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(models) - 1)]
    for dimension in summary["base"]:
        cells = [f"{summary[m][dimension]['mean']:.3f}" for m in models]
        deltas = [
            f"{summary[m][dimension]['delta']:+.3f} [{summary[m][dimension]['delta_ci_low']:+.3f}, "
            f"{summary[m][dimension]['delta_ci_high']:+.3f}]"
            for m in models[1:]
        ]
        lines.append(f"| {dimension} | " + " | ".join(cells + deltas) + " |")
    return "\n".join(lines) + "\n"


def sample_and_score(adapter, prompts: list[str], cfg, root: Path, reward_weights: dict[str, float], name: str):
    """Sample `cfg.num_videos_per_prompt` clips per eval prompt into `root` and score them.

    Writes `root/manifest.csv`, `root/videos/` and `root/scores.csv`; returns (manifest, scores).
    """
    from pgdpo.generation import generate_videos
    from pgdpo.io import write_table

    manifest = generate_videos(
        adapter, prompts, cfg.num_videos_per_prompt, cfg.seed, root,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        batch_size=cfg.batch_size, desc=f"evaluate {name}",
    )
    table = score_model_videos(manifest, root, reward_weights)
    write_table(table, root / "scores.csv")
    return manifest, table
