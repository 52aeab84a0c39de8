"""Score a manifest in shards on a Dask cluster; the merged table equals `score_manifest`'s.

Every clip is scored on its own, so shards are plain contiguous row ranges.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pgdpo.scoring.table import score_manifest
from pgdpo.sharding import ClusterSpec, run_shards, split_evenly


def score_shard(
    shard_index: int,
    manifest: pd.DataFrame,
    root: str,
    weights: dict[str, float],
    extra_scorers: list[str] | None,
    resource_options: dict | None = None,
) -> pd.DataFrame:
    """Score the rows of one shard; runs on a Dask worker."""
    return score_manifest(manifest, Path(root), weights, extra_scorers=extra_scorers, resource_options=resource_options)


def score_manifest_sharded(
    manifest: pd.DataFrame,
    root: Path,
    weights: dict[str, float],
    extra_scorers: list[str] | None = None,
    cluster: ClusterSpec | None = None,
    resource_options: dict | None = None,
) -> pd.DataFrame:
    """Score `manifest` like `score_manifest`, split into `cluster.shards` shards when that is > 1.

    `resource_options` goes to every shard's score_manifest; local paths in it must be
    absolute, because workers may run in another folder.
    """
    cluster = cluster or ClusterSpec()
    if cluster.shards == 1:
        return score_manifest(manifest, root, weights, extra_scorers=extra_scorers, resource_options=resource_options)
    ranges = split_evenly(len(manifest), cluster.shards)
    shard_args = [
        (
            index, manifest.iloc[start:stop].reset_index(drop=True), str(Path(root).resolve()), weights, extra_scorers,
            resource_options,
        )
        for index, (start, stop) in enumerate(ranges)
    ]
    tables = run_shards(score_shard, shard_args, cluster, name="score")
    return pd.concat(tables, ignore_index=True)
