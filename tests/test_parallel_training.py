"""Data-parallel training: `stages.train` with train.num_processes: 2 relaunches itself through
`accelerate launch`, trains two CPU ranks over gloo, and matches a single-process run."""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

import stages.train as train_stage
from pgdpo.config import Params, load_params
from pgdpo.io import write_table
from pgdpo.runtime import seed_everything
from pgdpo.tracking import Tracker
from pgdpo.training.parallel import DataParallel, launch_command
from tests.conftest import TINY_WAN_VIDEO, make_project, run_cli

ADAPTER_FILE = Path("data/adapter/pytorch_lora_weights.safetensors")
# Latent shape of one tiny Wan clip: 8 channels, 9 frames -> 5, 32x32 pixels -> 16x16.
LATENT_SHAPE = (8, 5, 16, 16)
NUM_PAIRS = 8
NUM_PROBE_PAIRS = 2


def write_pair_cache(project: Path) -> None:
    """Write the `label` stage's outputs with random latents, so that `train` runs without the stages before it."""
    generator = torch.Generator().manual_seed(0)
    pairs = pd.DataFrame({
        "pair_id": np.arange(NUM_PAIRS),
        "chosen_score": np.linspace(0.6, 1.0, NUM_PAIRS),
        "rejected_score": np.linspace(0.0, 0.4, NUM_PAIRS),
        "split": ["probe"] * NUM_PROBE_PAIRS + ["train"] * (NUM_PAIRS - NUM_PROBE_PAIRS),
    })
    folder = project / "data/pairs"
    folder.mkdir(parents=True)
    write_table(pairs, folder / "pairs.csv")
    tensors = {
        "chosen": torch.randn(NUM_PAIRS, *LATENT_SHAPE, generator=generator),
        "rejected": torch.randn(NUM_PAIRS, *LATENT_SHAPE, generator=generator),
        "prompt_embeds": torch.randn(NUM_PAIRS, 16, 32, generator=generator),
    }
    save_file(tensors, str(folder / "latents.safetensors"))


def set_num_processes(project: Path, num_processes: int) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["num_processes"] = num_processes
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def two_runs(tiny_wan_folder: Path, tmp_path_factory) -> dict:
    """Train 3 steps with batch 4 on two gloo ranks, then the same in one process."""
    project = make_project(
        tmp_path_factory.mktemp("parallel"),
        {
            "runtime": {"threads": 1},
            "base": {"model": str(tiny_wan_folder), "video": TINY_WAN_VIDEO},
            "train": {"steps": 3, "batch_size": 4, "probe_every": 3, "log_every": 1, "checkpoint_every": 0, "lr": 1e-3},
        },
    )
    write_pair_cache(project)
    runs: dict = {"project": project}

    set_num_processes(project, 2)
    # The command dvc.yaml runs: the launcher starts a tracking worker early, and the relaunch stops it.
    result = run_cli([sys.executable, "-m", "stages", "train"], project, timeout=300)
    runs["parallel_output"] = result.stdout + result.stderr
    runs["parallel_adapter"] = load_file(str(project / ADAPTER_FILE))
    runs["parallel_log"] = pd.read_csv(project / "plots/train.tsv", sep="\t")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs["parallel_mlflow"] = mlflow.search_runs(experiment_names=["pgdpo"])

    # The single-process reference runs the same stage function in this process, because starting
    # another interpreter costs more than the training. It seeds and sets threads as stage_main does.
    set_num_processes(project, 1)
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.chdir(project)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        params = load_params()
        seed_everything(params.seed)
        train_stage.run(params, Tracker(None))
    finally:
        torch.set_num_threads(threads)
        monkeypatch.undo()
    runs["single_adapter"] = load_file(str(project / ADAPTER_FILE))
    runs["single_log"] = pd.read_csv(project / "plots/train.tsv", sep="\t")
    return runs


def test_parallel_run_uses_two_gloo_ranks(two_runs: dict):
    output = two_runs["parallel_output"]
    assert "starting 2 training processes" in output
    assert "rank 0 of 2 joined the gloo process group" in output
    assert "rank 1 of 2 joined the gloo process group" in output
    assert "rank 1 finished; rank 0 writes the outputs" in output


def test_parallel_run_logs_one_mlflow_run(two_runs: dict):
    runs = two_runs["parallel_mlflow"]
    train_runs = runs[runs["tags.mlflow.runName"] == "train"]
    assert len(train_runs) == 1, "only rank 0 opens an MLflow run"
    assert train_runs["params.train.num_processes"].iloc[0] == "2"
    assert np.isfinite(train_runs["metrics.train/loss"].iloc[0])


def test_parallel_adapter_matches_single_process(two_runs: dict):
    parallel, single = two_runs["parallel_adapter"], two_runs["single_adapter"]
    assert sorted(parallel) == sorted(single)
    for key in single:
        # The two ranks' shards reach the sum in another order than one batch of 4, and Adam's
        # first steps move each weight by about lr whatever the gradient size, so weights agree to 1e-6.
        torch.testing.assert_close(parallel[key], single[key], rtol=1e-4, atol=1e-6, msg=f"LoRA weight {key}")


def test_parallel_log_has_whole_batch_metrics(two_runs: dict):
    parallel, single = two_runs["parallel_log"], two_runs["single_log"]
    assert parallel["step"].tolist() == [1, 2, 3]
    # The rounding differences of the first updates (see the adapter test) reach the loss of
    # step 3, which differed by 1.05e-4 relative on one machine and by less on others.
    np.testing.assert_allclose(parallel["loss"], single["loss"], rtol=5e-4)
    np.testing.assert_allclose(parallel["implicit_acc"], single["implicit_acc"])


def test_shard_rows_split_batch():
    assert DataParallel(rank=0, world_size=2).shard(4).tolist() == [0, 1]
    assert DataParallel(rank=1, world_size=2).shard(4).tolist() == [2, 3]
    with pytest.raises(ValueError, match="does not split over 2 processes"):
        DataParallel(rank=0, world_size=2).shard(3)


def test_launch_command_uses_loopback():
    command = launch_command("stages.train", 4, port=29555)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--main_process_ip") + 1] == "127.0.0.1"
    assert command[command.index("--main_process_port") + 1] == "29555"
    assert command[-2:] == ["-m", "stages.train"]


def test_batch_size_must_split_over_processes():
    with pytest.raises(ValidationError, match="must be a multiple of train.grad_accum_steps \\* train.num_processes = 4"):
        Params.model_validate({"train": {"batch_size": 6, "num_processes": 2, "grad_accum_steps": 2}})
