"""Evaluation: the base and the trained adapter sample the eval prompts from identical seeds,
and every clip is scored on the reported dimensions (params.yaml scoring.dimensions), their
VBench-style omni_total and the training reward."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pgdpo.scoring.registry import get_scorer, omni_total
from pgdpo.scoring.sharded import score_manifest_sharded
from pgdpo.scoring.table import REPORTED_DIMENSIONS, TOTAL
from pgdpo.sharding import ClusterSpec
from pgdpo.video import read_video

logger = logging.getLogger(__name__)

# Column of the VBench-style weighted total over the reported dimensions (see add_omni_total).
OMNI_TOTAL = "omni_total"


def bootstrap_interval(values: np.ndarray, seed: int, resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Return the percentile bootstrap interval of the mean of `values`."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def score_model_videos(
    manifest: pd.DataFrame,
    root: Path,
    reward_weights: dict[str, float],
    dimensions: Sequence[str] = REPORTED_DIMENSIONS,
    resource_options: Mapping[str, Mapping[str, Any]] | None = None,
    cluster: ClusterSpec | None = None,
) -> pd.DataFrame:
    """Score one model's eval clips on every reported dimension plus the reward total, in shards when `cluster.shards` > 1."""
    extra = [name for name in dimensions if name not in reward_weights]
    return score_manifest_sharded(
        manifest, root, reward_weights, extra_scorers=extra, cluster=cluster, resource_options=resource_options
    )


def add_omni_total(
    tables: dict[str, pd.DataFrame], dimensions: Sequence[str], quality_weight: float, semantic_weight: float
) -> None:
    """Add an `omni_total` column to every table, normalising each dimension over all tables together.

    All models share one min-max normalisation, so their totals are comparable. A group
    with no reported dimension gets weight 0, with a warning.
    """
    groups = {get_scorer(name).group for name in dimensions}
    weights = {"quality": quality_weight, "semantic": semantic_weight}
    for group in weights:
        if group not in groups and weights[group] > 0:
            logger.warning("omni_total: no %s dimension is reported, so the %s group weight is ignored", group, group)
            weights[group] = 0.0
    rows = pd.concat([table[list(dimensions)] for table in tables.values()], ignore_index=True).to_dict("records")
    totals = omni_total(rows, quality_weight=weights["quality"], semantic_weight=weights["semantic"])
    start = 0
    for table in tables.values():
        table[OMNI_TOTAL] = totals[start : start + len(table)]
        start += len(table)


def summarise(tables: dict[str, pd.DataFrame], seed: int, dimensions: Sequence[str] = REPORTED_DIMENSIONS) -> dict:
    """Per model and dimension: mean and 95% bootstrap interval; for non-base models also the
    difference to the base with the bootstrap interval of the paired per-clip differences.

    The dimensions are `dimensions`, then `omni_total` when the tables have it, then `total`.
    """
    summary: dict = {}
    base = tables["base"]
    extra = [OMNI_TOTAL] if OMNI_TOTAL in base else []
    for model, table in tables.items():
        block = {}
        for dimension in (*dimensions, *extra, TOTAL):
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


def dimension_plot_table(summary: dict) -> pd.DataFrame:
    """Return one row per dimension with the mean of each model and each model's difference to the base.

    The evaluate stage writes it to plots/eval_dimensions.tsv for dvc.yaml's bar plots.
    """
    rows = []
    for dimension in summary["base"]:
        row = {"dimension": dimension}
        for model, block in summary.items():
            row[model] = block[dimension]["mean"]
            if model != "base":
                row[f"{model}_delta"] = block[dimension]["delta"]
        rows.append(row)
    return pd.DataFrame(rows)


def sample_and_score(
    model,
    prompts: list[str],
    cfg,
    root: Path,
    reward_weights: dict[str, float],
    name: str,
    dimensions: Sequence[str] = REPORTED_DIMENSIONS,
    resource_options: Mapping[str, Mapping[str, Any]] | None = None,
    cluster: ClusterSpec | None = None,
):
    """Sample `cfg.num_videos_per_prompt` clips per eval prompt into `root` and score them on `dimensions`.

    `model` is a loaded adapter or a `pgdpo.generation.ModelSource`, which sharded sampling
    needs. With `cluster.shards > 1` sampling and scoring both run in shards on Dask, and the
    manifest and score rows are those of a one-shard run (docs/scaling.md describes the rounding).
    Writes `root/manifest.csv`, `root/videos/` and `root/scores.csv`, and returns (manifest, scores).
    """
    from pgdpo.generation import generate_videos
    from pgdpo.io import write_table

    manifest = generate_videos(
        model, prompts, cfg.num_videos_per_prompt, cfg.seed, root,
        num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
        batch_size=cfg.batch_size, desc=f"evaluate {name}", cluster=cluster,
    )
    table = score_model_videos(manifest, root, reward_weights, dimensions, resource_options, cluster)
    write_table(table, root / "scores.csv")
    return manifest, table
