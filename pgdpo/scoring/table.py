"""Score every clip of a manifest: one column per scorer plus the weighted total reward."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from pgdpo.scoring.registry import get_scorer, load_resources, weighted_total
from pgdpo.video import read_video

logger = logging.getLogger(__name__)

TOTAL = "total"

# Dimensions reported for every scored clip set, besides the reward `total`, when the
# caller passes none (params.yaml sets them in scoring.dimensions).
REPORTED_DIMENSIONS = ("oracle_color", "oracle_shape", "oracle_direction", "oracle_alignment", "temporal_flickering")


def score_manifest(
    manifest: pd.DataFrame,
    root: Path,
    weights: dict[str, float],
    extra_scorers: list[str] | None = None,
    resource_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> pd.DataFrame:
    """Decode each clip listed in `manifest` (paths relative to `root`) and score it.

    Args:
        manifest: table with at least prompt_id, prompt, index, seed and path columns.
        weights: scorer name -> weight of the total; every named scorer runs.
        extra_scorers: scorers that run and get a column but no weight in the total.
        resource_options: resource name -> loader options (for example the CLIP
            weights) for the resources the scorers need; see registry.load_resources.

    Returns:
        The manifest's id columns plus one column per scorer and a `total` column.
    """
    names = list(dict.fromkeys([*weights, *(extra_scorers or [])]))
    scorers = {name: get_scorer(name) for name in names}
    resources = load_resources(list(scorers.values()), resource_options)
    rows = []
    for record in tqdm(manifest.to_dict("records"), desc="score", unit="video"):
        frames = read_video(Path(root) / record["path"])
        scores = {}
        for name, scorer in scorers.items():
            needed = {key: resources[key] for key in scorer.resources}
            scores[name] = float(scorer(frames=frames, prompt=record["prompt"], **needed))
        bad = {name: value for name, value in scores.items() if not math.isfinite(value)}
        if bad:
            raise ValueError(f"non-finite scores {bad} for video {record['path']}; check the clip and scorers")
        scores[TOTAL] = weighted_total(scores, weights)
        rows.append({key: record[key] for key in ("prompt_id", "prompt", "index", "seed", "path")} | scores)
    table = pd.DataFrame(rows)
    logger.info("scored %d videos; mean total %.4f", len(table), table[TOTAL].mean())
    return table
