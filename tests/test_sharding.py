"""Sharded generation and scoring on a local Dask cluster give the bytes of a one-shard run, and sharded
evaluation gives its rows and nearly its clips."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from prefect.testing.utilities import prefect_test_harness

from pgdpo.evaluation import sample_and_score
from pgdpo.generation import ModelSource, candidate_seeds, generate_videos
from pgdpo.models import load_adapter
from pgdpo.models.adapter import VideoSpec, write_video_spec
from pgdpo.models.tiny_families import build_wan
from pgdpo.scoring.sharded import score_manifest_sharded
from pgdpo.scoring.table import REPORTED_DIMENSIONS
from pgdpo.sharding import ClusterSpec, dask_task_runner, split_evenly
from pgdpo.training.lora import save_lora
from pgdpo.video import read_video
from tests.conftest import add_nonzero_lora

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]


def test_split_evenly_cuts_at_unit_multiples():
    assert split_evenly(6, 3, unit=2) == [(0, 2), (2, 4), (4, 6)]
    assert split_evenly(7, 2, unit=2) == [(0, 4), (4, 7)]
    assert split_evenly(5, 4, unit=2) == [(0, 2), (2, 4), (4, 5)]
    assert split_evenly(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert split_evenly(0, 3) == []


def test_candidate_seeds_ignore_sharding():
    seeds = candidate_seeds(num_prompts=3, num_candidates=2, base_seed=100)
    assert seeds == [100, 101, 102, 103, 104, 105]
    # The seed of (prompt 2, candidate 1) is the same whether 1 or 3 prompts come first.
    assert candidate_seeds(1, 2, 100 + 2 * 2) == seeds[4:]


def test_cluster_spec_rejects_zero_shards():
    with pytest.raises(ValueError, match="shards must be >= 1, got 0"):
        ClusterSpec(shards=0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny") / "base"
    build_wan(0).save_pretrained(folder)
    write_video_spec(folder, VideoSpec(num_frames=5, height=32, width=32, fps=8, max_sequence_length=16))
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_default_runner_starts_loopback_cluster():
    runner = dask_task_runner(ClusterSpec(shards=3, workers=2))
    assert runner.address is None
    assert runner.cluster_kwargs["host"] == "127.0.0.1"
    assert runner.cluster_kwargs["n_workers"] == 2
    assert runner.cluster_kwargs["threads_per_worker"] == 1


def test_address_runner_connects_to_cluster():
    runner = dask_task_runner(ClusterSpec(shards=3, address="tcp://127.0.0.1:8786"))
    assert runner.address == "tcp://127.0.0.1:8786"
    assert runner.cluster_kwargs == {}


@pytest.fixture(scope="module")
def cluster_address():
    """A local Dask cluster of 2 single-threaded worker processes on the loopback interface."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_three_shards_match_one_shard(harness, cluster_address, tiny_model, tmp_path):
    # The one-shard run uses one torch thread, like the Dask workers (the nanny sets OMP_NUM_THREADS=1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = ModelSource(model=str(tiny_model), threads=1)
    cluster = ClusterSpec(shards=3, address=cluster_address)
    settings = dict(num_per_prompt=2, base_seed=7, num_inference_steps=2, guidance_scale=4.0, batch_size=2)
    weights = {"oracle_alignment": 1.0}
    try:
        one = generate_videos(source, PROMPTS, out_dir=tmp_path / "one", **settings)
        three = generate_videos(source, PROMPTS, out_dir=tmp_path / "three", cluster=cluster, **settings)
        scores_one = score_manifest_sharded(one, tmp_path / "one", weights)
        scores_three = score_manifest_sharded(three, tmp_path / "three", weights, cluster=cluster)
    finally:
        torch.set_num_threads(threads)

    assert len(one) == 6
    pd.testing.assert_frame_equal(one, three)
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "three")
    pd.testing.assert_frame_equal(scores_one, scores_three)


@pytest.fixture(scope="module")
def tiny_lora(tiny_model, tmp_path_factory) -> Path:
    """A LoRA adapter of the tiny model with nonzero B matrices, so it changes what the model samples."""
    adapter = load_adapter(tiny_model, torch.device("cpu"))
    add_nonzero_lora(adapter, scale=0.05)
    folder = tmp_path_factory.mktemp("lora") / "adapter"
    save_lora(adapter, folder)
    return folder


def mean_pixel_gap(root_a: Path, root_b: Path, paths: list[str]) -> float:
    """Return the mean absolute uint8 difference between the decoded clips at `paths` under two roots."""
    gaps = [
        np.abs(read_video(root_a / path).astype(np.int16) - read_video(root_b / path).astype(np.int16)).mean()
        for path in paths
    ]
    return float(np.mean(gaps))


def test_sharded_evaluation_matches_one_shard(harness, cluster_address, tiny_model, tiny_lora, tmp_path):
    source = ModelSource(model=str(tiny_model), lora=str(tiny_lora), threads=1)
    cfg = SimpleNamespace(num_videos_per_prompt=2, seed=11, num_inference_steps=2, guidance_scale=4.0, batch_size=2)
    weights = {"oracle_alignment": 1.0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local_manifest, local_scores = sample_and_score(source, PROMPTS, cfg, tmp_path / "one", weights, "one")
        sharded_manifest, sharded_scores = sample_and_score(
            source, PROMPTS, cfg, tmp_path / "two", weights, "two", cluster=ClusterSpec(shards=2, address=cluster_address)
        )
        base, _ = sample_and_score(ModelSource(model=str(tiny_model), threads=1), PROMPTS, cfg, tmp_path / "base", weights, "base")
    finally:
        torch.set_num_threads(threads)

    clip_columns = ["prompt_id", "prompt", "index", "seed", "path"]
    pd.testing.assert_frame_equal(local_manifest[clip_columns], sharded_manifest[clip_columns])
    pd.testing.assert_frame_equal(local_scores[clip_columns], sharded_scores[clip_columns])
    assert len(sharded_scores) == 6
    assert sharded_scores[list(REPORTED_DIMENSIONS)].notna().all().all()

    # NOTE: the clips are not compared byte for byte. A worker's float rounding depends on what
    # ran in its process before, and the cluster serves every test of this module. With the
    # LoRA adapter one clip of six came out rounded differently, and the MP4 encoder spread that
    # to up to 8 uint8 levels. The sharded clips must still be far closer to the one-shard clips
    # than to the base model's, which shows that the workers applied the adapter.
    paths = list(local_manifest["path"])
    rounding_gap = mean_pixel_gap(tmp_path / "one", tmp_path / "two", paths)
    adapter_gap = mean_pixel_gap(tmp_path / "base", tmp_path / "two", paths)
    assert rounding_gap < adapter_gap / 10, f"sharded clips differ by {rounding_gap:.3f} levels, the base by {adapter_gap:.3f}"
